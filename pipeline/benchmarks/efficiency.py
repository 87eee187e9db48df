"""Efficiency figures that compare across cards and runs: model FLOPs, MFU, the largest batch, crop rates.

Pure torch/numpy, CPU or GPU: ``count_flops`` counts what ``torch.utils.flop_counter.FlopCounterMode`` counts
(matmuls and convolutions, forward and backward; 2 FLOPs per multiply-add; norms, activations and the
optimizer are not counted), so a figure here is "model FLOPs" in the sense of MFU (Chowdhery et al. 2022).
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s per card, from the vendors' data sheets; the first
#: pattern that matches ``torch.cuda.get_device_name()`` wins (more specific names first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"GH200|H200", 989.0),
    (r"H100", 989.0),          # SXM5 (reported as "H100 80GB HBM3")
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The card's peak dense bf16 TFLOP/s from ``PEAK_BF16_TFLOPS``, or None for a card not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions ``fn()`` runs (forward and, when it calls backward, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu_figures(prefix: str, flops_per_step: int, steps_per_s: float, device_name: str) -> dict:
    """``<prefix>_achieved_tflops`` and ``<prefix>_mfu`` (achieved / the card's dense bf16 peak, with
    ``<prefix>_peak_bf16_tflops``); for a card not in ``PEAK_BF16_TFLOPS`` (or the CPU) the MFU is left out
    and ``<prefix>_mfu_note`` says why."""
    achieved = flops_per_step * steps_per_s / 1e12
    out: dict = {f"{prefix}_achieved_tflops": achieved}
    peak = peak_bf16_tflops(device_name)
    if peak is None:
        out[f"{prefix}_mfu_note"] = (f"no bf16 peak known for '{device_name}': add it to "
                                     "pipeline.benchmarks.efficiency.PEAK_BF16_TFLOPS")
    else:
        out[f"{prefix}_mfu"], out[f"{prefix}_peak_bf16_tflops"] = achieved / peak, peak
    return out


def largest_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 256) -> int:
    """The largest batch ``start * 2**k <= limit`` for which ``fits(batch)`` holds, doubling from ``start``;
    0 when ``start`` does not fit. ``fits`` runs a step and returns False on out-of-memory; an OOM it lets
    escape (``torch.OutOfMemoryError``) counts as False too."""
    best, batch = 0, start
    while batch <= limit:
        try:
            ok = fits(batch)
        except torch.OutOfMemoryError:
            ok = False
        if not ok:
            break
        best, batch = batch, batch * 2
    return best


def crop_pairs_per_s(crop_size_zyx, batch_pairs: int, seconds: float = 5.0, seed: int = 0,
                     volume_shape_zyx=(160, 256, 256), spacing_zyx_mm=(2.0, 1.0, 1.0)) -> float:
    """Guide crop pairs per second on one CPU core: ``sample_crop_pair`` (with mask and augmentation) from a
    memory-mapped synthetic int16 volume, as each training worker cuts them. At least one batch is timed."""
    from pipeline.guide.crops import sample_crop_pair

    rng = np.random.default_rng(seed)
    volume, mask = synthetic_volume(rng, tuple(volume_shape_zyx))
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "v.npy", volume)
        np.save(Path(tmp) / "m.npy", mask)
        volume, mask = np.load(Path(tmp) / "v.npy", mmap_mode="r"), np.load(Path(tmp) / "m.npy", mmap_mode="r")
        box = tuple((s // 4, 3 * s // 4) for s in volume.shape)
        pairs, t0 = 0, time.perf_counter()
        while pairs == 0 or time.perf_counter() - t0 < seconds:
            for _ in range(batch_pairs):
                sample_crop_pair(volume, spacing_zyx_mm, crop_size_zyx, rng, mask_zyx=mask, centre_box_zyx=box)
            pairs += batch_pairs
        rate = pairs / (time.perf_counter() - t0)
        del volume, mask
    return rate


def synthetic_volume(rng: np.random.Generator, shape=(160, 256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU (Z, Y, X): an elliptic water body with blobs of other densities in air, and its uint8 mask."""
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (0.35 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.42 * shape[2])) ** 2 < 1
    body = np.broadcast_to(body, shape)
    hu = np.where(body, 40.0, -1000.0)
    for _ in range(12):
        c = rng.uniform(0.2, 0.8, 3) * shape
        r = rng.uniform(8, 30)
        blob = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r ** 2
        hu = np.where(blob & body, rng.uniform(-900, 800), hu)
    return hu.astype(np.int16), body.astype(np.uint8)
