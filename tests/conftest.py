"""Shared fixtures: tiny preprocessed corpora written straight to disk (no Ray, no SimpleITK)."""

from pathlib import Path

import numpy as np
import pandas as pd


def write_tiny_corpus(root: Path, n: int = 3, shape=(20, 24, 28)) -> Path:
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "volumes").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        vol = rng.integers(-1000, 1000, size=shape).astype(np.int16)
        mask = np.zeros(shape, np.uint8)
        mask[4:16, 5:20, 6:22] = 1
        label = np.zeros(shape, np.uint8)
        label[8:10, 8:10, 8:10] = 6
        for name, arr in (("volumes", vol), ("masks", mask), ("labels", label)):
            np.save(root / name / f"v{i}.npy", arr)
        rows.append({"item_id": f"v{i}", "status": "accepted", "image_path": f"volumes/v{i}.npy",
                     "mask_path": f"masks/v{i}.npy", "label_path": f"labels/v{i}.npy", "shape": list(shape),
                     "scanner_key": "A" if i else "B", "patient_key": None,
                     "target_spacing_mm": [3.0, 3.0, 3.0], "origin_xyz_mm": [0.0, 0.0, 0.0]})
    rows.append({"item_id": "bad", "status": "rejected", "image_path": None, "mask_path": None,
                 "label_path": None, "shape": None, "scanner_key": None, "patient_key": None,
                 "target_spacing_mm": None, "origin_xyz_mm": None})
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    return root


