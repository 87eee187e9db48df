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


#: 4-connected in-plane neighbours, no link across slices: ``ndimage.label`` of every axial slice at once
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
_CROSS = _IN_PLANE[1:2]


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Holes of every axial slice of a (Z, Y, X) bool mask filled (as ``binary_fill_holes`` slice by slice,
    4-connected background), with one labelling of the whole volume instead of a loop over slices."""
    background, _ = ndimage.label(~mask, structure=_IN_PLANE)
    border = np.concatenate([background[:, [0, -1], :].ravel(), background[:, :, [0, -1]].ravel()])
    outside = np.zeros(int(background.max()) + 1, dtype=bool)
    outside[border] = True
    outside[0] = False                                   # label 0 = the mask itself
    return ~outside[background]


def _body_mask_on_grid(fg: np.ndarray, opening_vox: int) -> np.ndarray:
    if opening_vox > 0:
        # the in-plane diamond |dy| + |dx| <= r (the disk for r = 2) as r steps of the 5-voxel cross
        r = opening_vox
        core = largest_component(ndimage.binary_opening(fg, structure=_CROSS, iterations=r))
        fg = fg & ndimage.binary_dilation(core, structure=_CROSS, iterations=r)  # corners, skin given back
    return fill_holes_per_slice(largest_component(fg))


#: the block grid of ``body_mask`` must be at least this many blocks across a slice (else full resolution)
MIN_COARSE_SIDE = 32


def coarse_factors(spacing_zyx_mm, coarse_mm: float) -> tuple[int, int, int]:
    """Integer block size per axis that brings ``spacing_zyx_mm`` up to about ``coarse_mm`` (>= 1)."""
    return tuple(max(1, int(coarse_mm // s)) for s in spacing_zyx_mm)


def body_mask(volume_hu_zyx: np.ndarray, threshold_hu: float = -500.0, opening_vox: int = 2,
              spacing_zyx_mm=None, coarse_mm: float = 6.0) -> np.ndarray:
    """(Z, Y, X) bool body mask of a (Z, Y, X) HU volume.

    Voxels above ``threshold_hu``; the largest 3-D component of their opening (per axial slice, diamond
    ``|dy| + |dx| <= opening_vox`` voxels, the disk of radius 2 for the default: cuts a thin patient table,
    cushion or cables from the body) grown back by
    the same diamond within the thresholded voxels (corners and skin the opening removed); its largest
    component; holes of each axial slice filled (lungs, bowel gas). Empty when nothing exceeds the threshold.

    With ``spacing_zyx_mm`` finer than ``coarse_mm`` (and at least ``MIN_COARSE_SIDE`` blocks across a
    slice), the shape is found on blocks of about ``coarse_mm`` (a block is foreground when most of its
    voxels are; the opening radius becomes ``opening_vox`` / block side, at least 1) and
    brought back to full resolution: the coarse mask's interior (eroded by one block) is body, and in the
    one-block band around its edge the voxels above the threshold are. This costs a fraction of the
    full-resolution labelling in time and memory, for a skin line that stays exact.
    """
    if volume_hu_zyx.ndim != 3:
        raise ValueError(f"body_mask needs a (Z, Y, X) volume, got shape {volume_hu_zyx.shape}")
    fg = np.asarray(volume_hu_zyx) > threshold_hu
    f = (1, 1, 1) if spacing_zyx_mm is None else coarse_factors(spacing_zyx_mm, coarse_mm)
    shape = np.asarray(fg.shape)
    if f == (1, 1, 1) or min(shape[1] // f[1], shape[2] // f[2]) < MIN_COARSE_SIDE:
        return _body_mask_on_grid(fg, opening_vox)
    padded = -(-shape // f) * f
    blocks = np.zeros(tuple(padded), dtype=np.uint8)
    blocks[:shape[0], :shape[1], :shape[2]] = fg
    blocks = blocks.reshape(padded[0] // f[0], f[0], padded[1] // f[1], f[1], padded[2] // f[2], f[2])
    coarse_opening = max(1, round(opening_vox / min(f[1], f[2]))) if opening_vox > 0 else 0
    coarse = _body_mask_on_grid(blocks.mean(axis=(1, 3, 5)) >= 0.5, coarse_opening)
    inner = ndimage.binary_erosion(coarse, structure=np.ones((1, 3, 3), bool), border_value=1)
    band = ndimage.binary_dilation(coarse, structure=np.ones((3, 3, 3), bool)) & ~inner

    def full(m: np.ndarray) -> np.ndarray:
        up = m.repeat(f[0], 0).repeat(f[1], 1).repeat(f[2], 2)
        return up[:shape[0], :shape[1], :shape[2]]

    body = full(inner)
    body |= full(band) & fg
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
