"""The networks' input conventions: HU windowed to [0, 1], the body box of a mask, padding with air.

torch + numpy only, no other ``pipeline`` import: `anatdiff export` ships this module as it is
(``pipeline/evaluation/export.py``), so an exported backbone reads its input exactly as training did.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: HU of air, the value volumes are padded with outside the scan
PAD_HU = -1024


def scale_hu(image_hu: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window_hu`` and map it linearly to [0, 1] float32."""
    low, high = window_hu
    return ((np.clip(image_hu, low, high) - low) / (high - low)).astype(np.float32)


def air_value(window_hu: tuple[float, float]) -> float:
    """``PAD_HU`` as the network sees it after ``scale_hu``: the value padding outside a scan takes."""
    return float(scale_hu(np.array(PAD_HU), window_hu))


def body_bbox_zyx(mask_zyx: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Inclusive (first, last) voxel of the body per axis of a (Z, Y, X) mask; the whole volume when the
    mask is empty. The box ``bodybox_coords`` normalises to."""
    mask = np.asarray(mask_zyx)
    if not mask.any():
        return tuple((0, s - 1) for s in mask.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append((int(idx[0]), int(idx[-1])))
    return tuple(box)


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float) -> torch.Tensor:
    """Pad (B, C, D, H, W) at the far end of each axis with ``value`` to multiples of ``multiple``."""
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % multiple]
    return F.pad(x, pads, value=value)
