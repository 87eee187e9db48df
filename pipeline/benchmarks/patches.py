"""`anatdiff benchmark patches`: patches/s per core of the patch streams vs torch DataLoader baselines.

All four cut the same patches (``sample_patch``: body-centred, HU window, body-box coordinates) from the same
preprocessed ``.npy`` volumes, in one process run (see docs/benchmarks.md):
- ``patch_stream``: the per-worker ``PatchStream`` (memory map), in this process: 1 core;
- ``ray_data``: ``patch_dataset`` (memory map) with one 1-CPU actor per core, read by ``rank_batches``;
- ``dataloader_naive``: a map-style Dataset whose ``__getitem__`` ``np.load``s the WHOLE volume and mask;
- ``dataloader_mmap``: the same Dataset on memory maps; both with one DataLoader worker process per core.
Per core = patches/s / cores the method may use. The first batch of each (start-up) is not timed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.benchmarks.preprocess import make_corpus, preprocess_loop, scratch
from pipeline.config import PreprocessConfig
from pipeline.data.patches import PatchStream, VolumeRef, load_volume_refs, sample_patch

#: (phantoms, preprocess spacing zyx mm, patch size zyx, batch size, timed batches)
QUICK = (4, (3.0, 3.0, 3.0), (32, 32, 32), 4, 12)
FULL = (8, (2.0, 1.0, 1.0), (32, 128, 128), 4, 24)


class WholeVolumePatches(Dataset):
    """Map-style baseline: item i is the patch ``PatchStream`` logic cuts with rng ``(seed, i)``.

    ``mmap=False`` reads the whole image and mask with ``np.load`` for every item (the naive loader);
    ``mmap=True`` keeps per-worker memory maps (and body boxes) like ``PatchStream``.
    """

    def __init__(self, refs: list[VolumeRef], size_zyx, window_hu, length: int, mmap: bool, seed: int = 0):
        self.refs, self.size, self.window = refs, tuple(size_zyx), tuple(window_hu)
        self.length, self.mmap, self.seed = length, mmap, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, i])
        ref = self.refs[int(rng.integers(len(self.refs)))]
        if not self.mmap:  # a fresh ref whose arrays are fully loaded: nothing cached between items
            ref = VolumeRef(ref.item_id, ref.image_path, ref.mask_path, None, ref.shape_zyx)
            ref._cache.update(image=np.load(ref.image_path), mask=np.load(ref.mask_path))
        patch = sample_patch(ref, self.size, self.window, rng)
        patch.pop("label", None)
        return patch


def _rate(batches, batch_size: int, n_batches: int) -> float:
    """Patches/s over ``n_batches`` batches of an iterator, after one untimed batch."""
    it = iter(batches)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def stream_rate(refs, size, window, batch: int, n: int) -> float:
    """Patches/s of ``PatchStream.batch`` in this process (one core)."""
    stream = PatchStream(refs, size, window, seed=0)
    return _rate((stream.batch(step, batch) for step in range(n + 1)), batch, n)


def loader_rate(refs, size, window, batch: int, n: int, mmap: bool, workers: int) -> float:
    """Patches/s of a torch DataLoader over ``WholeVolumePatches`` with ``workers`` processes."""
    data = WholeVolumePatches(refs, size, window, (n + 1 + 2 * workers) * batch, mmap)
    loader = DataLoader(data, batch_size=batch, num_workers=workers, prefetch_factor=2)
    return _rate(loader, batch, n)


def ray_rate(data_dir: Path, size, window, batch: int, n: int, cores: int) -> float:
    """Patches/s of ``patch_dataset`` (``cores`` 1-CPU actors) read by ``rank_batches`` in this process."""
    from pipeline.distributed.patch_dataset import local_ray, patch_dataset, rank_batches

    with local_ray(cores + 1):
        ds = patch_dataset(data_dir, size, window, batch, n + 1, num_workers=1, concurrency=cores,
                           cpus_per_actor=1.0)
        return _rate(rank_batches(ds, batch, prefetch_batches=2), batch, n)


def prepare(root: Path, n: int, spacing_zyx_mm) -> Path:
    """Synthesize and preprocess (single process) ``n`` phantoms at ``spacing_zyx_mm``, once."""
    out = root / f"patches-{n}-{'x'.join(map(str, spacing_zyx_mm))}"
    if not (out / "manifest.parquet").is_file():
        make_corpus(root / f"corpus-{n}", n, spacing_mm=None)
        cfg = PreprocessConfig(input=str(root / f"corpus-{n}"), output=str(out),
                               target_spacing_zyx_mm=spacing_zyx_mm, log_to_mlflow=False)
        preprocess_loop(cfg)
    return out


def run(workdir: str | Path | None = None, quick: bool = False) -> dict:
    """Patches/s per core of each method and their ratios, as one JSON-able dict."""
    n_vol, spacing, size, batch, n = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    data_dir = prepare(scratch(workdir), n_vol, spacing)
    refs = load_volume_refs(data_dir)
    window = (-1000.0, 1000.0)
    torch.set_num_threads(1)
    per_core = {
        "patch_stream": stream_rate(refs, size, window, batch, n),
        "dataloader_naive": loader_rate(refs, size, window, batch, n, mmap=False, workers=cores) / cores,
        "dataloader_mmap": loader_rate(refs, size, window, batch, n, mmap=True, workers=cores) / cores,
        "ray_data": ray_rate(data_dir, size, window, batch, n, cores) / cores,
    }
    volume_mb = float(np.mean([r.image_path.stat().st_size for r in refs])) / 1e6
    return {
        "machine_cores": cores, "volumes": len(refs), "mean_volume_mb": volume_mb,
        "patch_size_zyx": list(size), "batch_size": batch, "timed_batches": n,
        **{f"{k}_patches_per_s_per_core": v for k, v in per_core.items()},
        "patches_per_s_per_core": per_core["patch_stream"],
        "patch_stream_vs_dataloader": per_core["patch_stream"] / per_core["dataloader_naive"],
        "patch_stream_vs_dataloader_mmap": per_core["patch_stream"] / per_core["dataloader_mmap"],
        "ray_data_vs_dataloader": per_core["ray_data"] / per_core["dataloader_naive"],
        "ray_data_vs_patch_stream": per_core["ray_data"] / per_core["patch_stream"],
    }
