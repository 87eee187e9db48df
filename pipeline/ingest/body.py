"""Body mask of a CT volume (vox2vec's recipe plus an opening that detaches the patient table)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool array, same shape: the largest 26-connected component of ``mask`` (all False if empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(volume_hu_zyx: np.ndarray, threshold_hu: float = -500.0, opening_vox: int = 2) -> np.ndarray:
    """(Z, Y, X) bool body mask of a (Z, Y, X) HU volume.

    Voxels above ``threshold_hu``; the largest 3-D component of their opening (per axial slice, disk of
    radius ``opening_vox`` voxels: cuts a thin patient table, cushion or cables from the body) grown back by
    the same disk within the thresholded voxels (corners and skin the opening removed); its largest
    component; holes of each axial slice filled (lungs, bowel gas). Empty when nothing exceeds the threshold.
    """
    if volume_hu_zyx.ndim != 3:
        raise ValueError(f"body_mask needs a (Z, Y, X) volume, got shape {volume_hu_zyx.shape}")
    fg = np.asarray(volume_hu_zyx) > threshold_hu
    if opening_vox > 0:
        r = opening_vox
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disk = (yy ** 2 + xx ** 2 <= r * r)[None]
        core = largest_component(ndimage.binary_opening(fg, structure=disk))
        fg = fg & ndimage.binary_dilation(core, structure=disk)  # give back corners and skin the opening ate
    body = largest_component(fg)
    for k in np.flatnonzero(body.any(axis=(1, 2))):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def bbox_zyx(mask: np.ndarray, margin_zyx: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
    """Slices (z, y, x) of the smallest box holding every True voxel of a (Z, Y, X) mask, grown by
    ``margin_zyx`` voxels on each side and clipped to the array. Raises ValueError for an empty mask."""
    if not mask.any():
        raise ValueError("bbox_zyx: the mask is empty (no True voxel)")
    out = []
    for axis, margin in enumerate(margin_zyx):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)
