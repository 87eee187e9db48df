"""95th-percentile Hausdorff distance (HD95) per organ, in mm, from surface voxels and distance transforms."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.labels import NUM_ORGANS


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (bool (D, H, W))."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                          border_value=0)


def hd95_mm(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx_mm) -> float:
    """Symmetric HD95 in mm between two bool (D, H, W) masks: the 95th percentile of the distances of both
    surfaces to the other one (voxel centres, physical spacing). NaN if either mask is empty."""
    if not pred_mask.any() or not ref_mask.any():
        return float("nan")
    sp = tuple(float(s) for s in spacing_zyx_mm)
    s_pred, s_ref = _surface(pred_mask), _surface(ref_mask)
    to_ref = ndimage.distance_transform_edt(~s_ref, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp)
    distances = np.concatenate([to_ref[s_pred], to_pred[s_ref]])
    return float(np.percentile(distances, 95))


def hd95_per_organ(pred_zyx: np.ndarray, label_zyx: np.ndarray, spacing_zyx_mm,
                   num_organs: int = NUM_ORGANS) -> np.ndarray:
    """(num_organs,) float64 HD95 in mm of labels 1..num_organs; NaN where the organ is missing in either map.

    pred_zyx, label_zyx: (D, H, W) integer label maps of the same shape; spacing_zyx_mm: voxel size (z, y, x).
    """
    if pred_zyx.shape != label_zyx.shape:
        raise ValueError(f"pred_zyx shape {pred_zyx.shape} differs from label_zyx shape {label_zyx.shape}")
    return np.array([hd95_mm(pred_zyx == k, label_zyx == k, spacing_zyx_mm) for k in range(1, num_organs + 1)])
