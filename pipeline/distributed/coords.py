"""Coordinate maps of the learned guide, written beside the preprocessed volumes by Ray tasks.

``<data>/coords/<guide_id>/<item_id>.npy``: (3, D, H, W) float16 in [0, 1], channels (z, y, x), where
``guide_id`` is a hash of the guide file. Computed once per corpus and guide (reruns skip finished maps),
then cut by memory map beside the image patches: training pays no guide forward pass per step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import UserError
from pipeline.data.patches import load_volume_refs
from pipeline.io.atomic import write_atomic


def resolve_guide(spec: str, tracking_uri: str | None, workdir: Path) -> tuple[Path, str | None]:
    """A guide file from ``runs:/<run_id>`` (MLflow artifact ``guide/guide.pt``) or a path: (file, run id)."""
    run_id = tracking.run_id_of(spec)
    if run_id is not None:
        uri = tracking.connect(tracking_uri)
        local = tracking.download_artifacts(uri, run_id, "guide", workdir)
        return local / "guide.pt", run_id
    path = Path(spec)
    path = path / "guide.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"guide_checkpoint '{spec}' is neither runs:/<run_id> nor a guide.pt file")
    return path.resolve(), None


def guide_id(guide_file: Path) -> str:
    return hashlib.sha256(guide_file.read_bytes()).hexdigest()[:12]


def _write_map(row: dict) -> dict:
    import torch

    from pipeline.guide.inference import load_guide, predict_coords

    torch.set_num_threads(1)
    out = Path(row["out"])
    volume = np.load(row["image"], mmap_mode="r")
    guide = load_guide(row["guide"])
    coords = predict_coords(guide, np.asarray(volume)).astype(np.float16)
    write_atomic(out, lambda tmp: np.save(tmp, coords))
    return {"item_id": row["item_id"]}


def ensure_coord_maps(data_dir: str | Path, guide_file: Path) -> Path:
    """Write the missing coordinate maps of every accepted volume of ``data_dir``; returns their folder."""
    import ray

    data_dir = Path(data_dir).resolve()
    out_dir = data_dir / "coords" / guide_id(guide_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [{"item_id": r.item_id, "image": str(r.image_path), "guide": str(guide_file),
             "out": str(out_dir / f"{r.item_id}.npy")}
            for r in load_volume_refs(data_dir) if not (out_dir / f"{r.item_id}.npy").exists()]
    if todo:
        task = ray.remote(num_cpus=1)(_write_map)
        ray.get([task.remote(row) for row in todo])
    return out_dir
