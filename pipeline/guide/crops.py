"""Overlapping crop pairs for the coordinate guide's self-supervised training (APE-style).

Two crops of one scan, each resampled (trilinear) to its own random voxel spacing, both of ``crop_size_zyx``
voxels, with intensity augmentation and random block masking. Positions are in the scan's **volume frame**:
volume voxel (k, j, i) sits at ``(k, j, i) * spacing_zyx_mm`` mm, and crop voxel ``m`` (z, y, x) at
``origin_zyx_mm + m * crop_spacing_zyx_mm`` (``crop_positions_mm``). Only the region a crop covers is read
from the memory-mapped volume.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.inputs import PAD_HU, scale_hu
from pipeline.data.patches import cut_patch
from pipeline.guide.augment import augment_crop
from pipeline.guide.model import GUIDE_WINDOW_HU

#: default crop spacing, per axis, as a factor of the volume's spacing (uniform in this range)
SPACING_FACTOR_RANGE = (0.75, 1.5)


def crop_positions_mm(origin_zyx_mm, spacing_zyx_mm, index_zyx):
    """Physical position (mm, volume frame, z y x) of crop voxel indices: ``origin + index * spacing``.

    Works for numpy arrays and torch tensors: origin, spacing (..., 3); index (..., 3), broadcast.
    """
    return origin_zyx_mm + index_zyx * spacing_zyx_mm


def _spacing_bounds(spacing_zyx_mm: np.ndarray, spacing_range_mm) -> np.ndarray:
    """(3, 2) low/high crop spacing per axis in mm."""
    if spacing_range_mm is None:
        return spacing_zyx_mm[:, None] * np.asarray(SPACING_FACTOR_RANGE)[None]
    bounds = np.asarray(spacing_range_mm, dtype=np.float64)
    if bounds.shape == (2,):
        bounds = np.tile(bounds, (3, 1))
    if bounds.shape != (3, 2) or np.any(bounds <= 0) or np.any(bounds[:, 0] > bounds[:, 1]):
        raise ValueError(f"spacing_range_mm must be (low, high) or three (low, high) pairs (z, y, x) with "
                         f"0 < low <= high mm, got {spacing_range_mm}")
    return bounds


def _pair_origins_mm(shape_zyx, spacing_zyx_mm, crop_spacing_mm, size, rng, centre_box_zyx,
                     max_shift_fraction) -> np.ndarray:
    """(2, 3) crop origins (mm): crop A centred on a random voxel of ``centre_box_zyx`` (inclusive
    (first, last) per axis; whole volume if None), crop B shifted so that the two overlap on every axis."""
    box = centre_box_zyx if centre_box_zyx is not None else [(0, s - 1) for s in shape_zyx]
    centre_a = np.array([rng.uniform(lo, hi) for lo, hi in box]) * spacing_zyx_mm
    extents = (size - 1) * crop_spacing_mm                              # (2, 3) mm
    shift = rng.uniform(-1.0, 1.0, 3) * max_shift_fraction * extents.min(axis=0) / 2
    centres = np.stack([centre_a, centre_a + shift])
    return centres - extents / 2


def _interpolate_axis(region: np.ndarray, axis: int, index: np.ndarray, order: int) -> np.ndarray:
    """``region`` read at continuous indices ``index`` (1-D) along ``axis``, clamped to its edges (scipy's
    ``mode="nearest"``): order 1 linear in float32, order 0 the nearest voxel (``floor(index + 0.5)``)."""
    last = region.shape[axis] - 1
    if order == 0:
        return np.take(region, np.clip(np.floor(index + 0.5), 0, last).astype(np.intp), axis=axis)
    i0 = np.clip(np.floor(index), 0, last).astype(np.intp)
    w = np.clip(index - i0, 0.0, 1.0).astype(np.float32)
    w = w.reshape([-1 if a == axis else 1 for a in range(region.ndim)])
    low, high = np.take(region, i0, axis=axis), np.take(region, np.minimum(i0 + 1, last), axis=axis)
    return low + (high - low) * w


def resample_crop(volume_zyx: np.ndarray, spacing_zyx_mm, origin_zyx_mm, crop_spacing_zyx_mm,
                  crop_size_zyx, fill: float, order: int = 1) -> np.ndarray:
    """Resample the crop grid ``origin + m * crop_spacing`` (mm, volume frame) from ``volume_zyx``.

    Reads only the covered region (``cut_patch``, padding with ``fill`` outside the volume). The grid is
    axis-aligned, so trilinear interpolation is three 1-D passes (z, then y, then x; the same values as
    ``scipy.ndimage.map_coordinates`` order 1, in float32) and nearest neighbour one indexed read per axis.
    order 1: trilinear (images), 0: nearest (masks). Returns float32 (D, H, W) = ``crop_size_zyx``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (trilinear), got {order}")
    axes = [(origin_zyx_mm[a] + np.arange(n) * crop_spacing_zyx_mm[a]) / spacing_zyx_mm[a]
            for a, n in enumerate(crop_size_zyx)]                       # continuous volume indices per axis
    lo = np.array([int(np.floor(ax[0])) for ax in axes])
    hi = np.array([int(np.floor(ax[-1])) + 2 for ax in axes])
    out = cut_patch(volume_zyx, lo, tuple(hi - lo), fill)
    out = out if order == 0 else out.astype(np.float32)
    for axis, (ax, start) in enumerate(zip(axes, lo)):
        out = _interpolate_axis(out, axis, ax - start, order)
    return out.astype(np.float32, copy=False)


def augment_intensity(image01: np.ndarray, rng: np.random.Generator, gamma_range=(0.7, 1.5),
                      contrast_range=(0.75, 1.25), noise_std_max: float = 0.05) -> np.ndarray:
    """Random gamma, contrast (around the mean) and Gaussian noise on a [0, 1] float image; clipped to [0, 1].

    The original mild recipe, ``augment.augment_crop`` with its defaults (float32; the noise from torch's
    vectorized sampler seeded from ``rng``, so the result is a function of ``rng``).
    """
    return augment_crop(image01, rng, gamma_range, contrast_range, noise_std_max)


def mask_blocks(image01: np.ndarray, rng: np.random.Generator, max_blocks: int = 4,
                size_fraction=(0.1, 0.3)) -> np.ndarray:
    """Set 0 to ``max_blocks`` random boxes (each side a ``size_fraction`` of the crop) to 0 (window min)."""
    out = image01.copy()
    for _ in range(rng.integers(0, max_blocks + 1)):
        sides = [max(1, int(round(n * rng.uniform(*size_fraction)))) for n in out.shape]
        starts = [rng.integers(0, n - s + 1) for n, s in zip(out.shape, sides)]
        out[tuple(slice(a, a + s) for a, s in zip(starts, sides))] = 0.0
    return out


def cut_scan_end(image01: np.ndarray, body: np.ndarray, rng: np.random.Generator,
                 fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a scan that ends inside the crop: every slice above (or below, at random) a random slice in
    the crop's middle half becomes air (``fill``, the window minimum) and leaves the body mask. A guide
    trained to give the same coordinates with and without the cut cannot read its position from where a
    scan happens to start or stop (fields of view vary between scans)."""
    depth = image01.shape[0]
    k = int(rng.integers(depth // 4, max(depth // 4 + 1, 3 * depth // 4)))
    cut = slice(k, None) if rng.random() < 0.5 else slice(0, k)
    image01, body = image01.copy(), body.copy()
    image01[cut] = fill
    body[cut] = False
    return image01, body


def sample_crop_pair(volume_hu_zyx: np.ndarray, spacing_zyx_mm, crop_size_zyx, rng: np.random.Generator,
                     spacing_range_mm=None, mask_zyx: np.ndarray | None = None, centre_box_zyx=None,
                     window_hu=GUIDE_WINDOW_HU, max_shift_fraction: float = 0.5, augment: bool = True,
                     max_blocks: int = 4, scan_end_probability: float = 0.0,
                     augment_params: dict | None = None) -> dict[str, np.ndarray]:
    """Two overlapping crops of one scan at two random spacings.

    volume_hu_zyx: (Z, Y, X) int16 HU, canonical LPS, typically a memmap. mask_zyx: its body mask (optional).
    spacing_range_mm: crop spacing per axis, uniform in (low, high) mm, or three such pairs (z, y, x);
        None: ``SPACING_FACTOR_RANGE`` times the volume spacing.
    centre_box_zyx: inclusive voxel box ((z0, z1), (y0, y1), (x0, x1)) for crop A's centre, e.g. the body box.
    max_shift_fraction: crop B's centre moves at most this fraction of half the smaller crop per axis.
    scan_end_probability: chance that one crop of the pair (never both) gets ``cut_scan_end`` (when
        ``augment``).
    augment_params: keyword arguments of ``augment.augment_crop`` (``GuideAugmentConfig``); None: its defaults.
    Returns ``image`` (2, 1, D, H, W) float32 in [0, 1] (window, then augmentation and masking when
    ``augment``), ``body`` (2, D, H, W) bool (all True without a mask), ``origin_zyx_mm`` (2, 3) and
    ``spacing_zyx_mm`` (2, 3) float64: crop c's voxel m lies at ``origin[c] + m * spacing[c]`` mm.
    """
    spacing = np.asarray(spacing_zyx_mm, dtype=np.float64)
    size = np.asarray(crop_size_zyx, dtype=int)
    if volume_hu_zyx.ndim != 3 or spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"need a 3D volume and 3 positive spacings (z, y, x) mm; got volume shape "
                         f"{volume_hu_zyx.shape}, spacing_zyx_mm {spacing_zyx_mm}")
    if size.shape != (3,) or np.any(size < 2):
        raise ValueError(f"crop_size_zyx must be 3 ints >= 2, got {crop_size_zyx}")
    if not 0.0 <= max_shift_fraction <= 1.0:
        raise ValueError(f"max_shift_fraction must be in [0, 1], got {max_shift_fraction}")
    bounds = _spacing_bounds(spacing, spacing_range_mm)
    crop_spacing = rng.uniform(bounds[:, 0], bounds[:, 1], size=(2, 3))
    origins = _pair_origins_mm(volume_hu_zyx.shape, spacing, crop_spacing, size, rng, centre_box_zyx,
                               max_shift_fraction)
    images, bodies = [], []
    cut_crop = int(rng.integers(0, 2)) if augment and rng.random() < scan_end_probability else -1
    for c in range(2):
        hu = resample_crop(volume_hu_zyx, spacing, origins[c], crop_spacing[c], size, PAD_HU)
        image = scale_hu(hu, window_hu)
        body = (np.ones(tuple(size), bool) if mask_zyx is None else
                resample_crop(mask_zyx, spacing, origins[c], crop_spacing[c], size, 0, order=0) > 0.5)
        if c == cut_crop:
            image, body = cut_scan_end(image, body, rng)
        if augment:
            image = mask_blocks(augment_crop(image, rng, **(augment_params or {})), rng, max_blocks)
        images.append(image[None])
        bodies.append(body)
    return {"image": np.stack(images), "body": np.stack(bodies), "origin_zyx_mm": origins,
            "spacing_zyx_mm": crop_spacing}
