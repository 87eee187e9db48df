"""The model's grid and back: the body-box crop a segmenter sees, and its class probabilities brought onto the
scan's original grid (same size, spacing, origin and direction as the input image).

Both directions work in LPS physical space (mm) through SimpleITK: probabilities are sampled at the physical
position of every original voxel (linear interpolation of each class channel), then the class with the
highest probability wins. Outside the crop every voxel is background.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.ingest.body import bbox_zyx, body_mask
from pipeline.ingest.geometry import Grid, resample_hu_int16, to_canonical
from pipeline.ingest.preprocess import CROP_MARGIN_MM, HU_RANGE
from pipeline.ingest.qc import Rejected


@dataclass(frozen=True)
class ModelInput:
    """What a segmenter sees: ``volume_hu`` (Z, Y, X) int16 and ``mask`` (Z, Y, X) bool on ``grid`` (the
    canonical crop: identity direction, the model's spacing)."""

    volume_hu: np.ndarray
    mask: np.ndarray
    grid: Grid


def crop_grid(grid: Grid, box_zyx: tuple[slice, slice, slice]) -> Grid:
    """The sub-grid of ``grid`` holding ``array[box_zyx]`` (same spacing and direction)."""
    start_xyz = [b.start for b in box_zyx[::-1]]
    size_xyz = tuple(int(b.stop - b.start) for b in box_zyx[::-1])
    return Grid(size_xyz, grid.spacing_xyz, grid.point(start_xyz), grid.direction)


def model_input(image: sitk.Image, spacing_zyx_mm, body_threshold_hu: float) -> ModelInput:
    """``image`` (any direction) as ``anatdiff preprocess`` writes it: canonical LPS, resampled to
    ``spacing_zyx_mm`` (mm) as int16 HU, cropped to the body box + ``CROP_MARGIN_MM``. The same calls in the
    same order as ``pipeline.ingest.preprocess``; a test holds the two equal. Raises Rejected (no body)."""
    volume_hu, grid = resample_hu_int16(to_canonical(image), spacing_zyx_mm, HU_RANGE)
    mask = body_mask(volume_hu, body_threshold_hu, spacing_zyx_mm=spacing_zyx_mm)
    if not mask.any():
        raise Rejected(f"no body: no connected region above {body_threshold_hu} HU")
    margin = tuple(math.ceil(CROP_MARGIN_MM / s) for s in spacing_zyx_mm)
    box = bbox_zyx(mask, margin)
    return ModelInput(np.ascontiguousarray(volume_hu[box]), np.ascontiguousarray(mask[box]), crop_grid(grid, box))


def _on_grid(array_zyx: np.ndarray, grid: Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([float(v) for v in grid.spacing_xyz])
    image.SetOrigin([float(v) for v in grid.origin_xyz])
    image.SetDirection([float(v) for v in grid.direction])
    return image


def overlap_region(grid: Grid, reference: sitk.Image) -> tuple[slice, slice, slice] | None:
    """Slices (z, y, x) of the ``reference`` voxels that can see ``grid`` (the box of its voxel edges, plus one
    voxel for interpolation), or None when they do not overlap."""
    low, high = [], []
    size = np.asarray(grid.size_xyz, dtype=float)
    for corner in itertools.product((0.0, 1.0), repeat=3):
        point = grid.point(np.asarray(corner) * size - 0.5)
        index = reference.TransformPhysicalPointToContinuousIndex(point)
        low.append(index)
        high.append(index)
    lo = np.floor(np.min(low, axis=0)).astype(int) - 1
    hi = np.ceil(np.max(high, axis=0)).astype(int) + 2
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(reference.GetSize()))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))


def _sub_reference(reference: sitk.Image, region_zyx: tuple[slice, slice, slice]) -> sitk.Image:
    """An empty uint8 image on the voxels ``region_zyx`` of ``reference`` (its geometry, no pixel copy)."""
    start_xyz = [s.start for s in region_zyx[::-1]]
    out = sitk.Image([s.stop - s.start for s in region_zyx[::-1]], sitk.sitkUInt8)
    out.SetSpacing(reference.GetSpacing())
    out.SetDirection(reference.GetDirection())
    out.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in start_xyz]))
    return out


def labels_on_reference(probs_czyx: np.ndarray, grid: Grid, reference: sitk.Image) -> np.ndarray:
    """(Z, Y, X) uint8 labels on ``reference``'s grid from (C, z, y, x) class probabilities on ``grid``.

    Each channel is resampled in physical space (linear; outside ``grid`` background = 1, organs = 0), and a
    voxel takes the channel with the highest value (ties: the lower label, as ``np.argmax``). Interpolation
    is a convex combination, so the resampled channels still sum to 1 and the winner is >= 1/C: a channel
    whose maximum on ``grid`` is below that is skipped (it cannot win). Peak memory: two float32 arrays of
    the reference region that overlaps ``grid``.
    """
    n_classes = probs_czyx.shape[0]
    out = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    region = overlap_region(grid, reference)
    if region is None:
        return out
    sub = _sub_reference(reference, region)
    best, label = None, None
    for c in range(n_classes):
        if c > 0 and float(probs_czyx[c].max()) < 0.99 / n_classes:
            continue
        moved = sitk.Resample(_on_grid(np.ascontiguousarray(probs_czyx[c], dtype=np.float32), grid), sub,
                              sitk.Transform(), sitk.sitkLinear, 1.0 if c == 0 else 0.0, sitk.sitkFloat32)
        values = sitk.GetArrayFromImage(moved)
        if best is None:
            best, label = values, np.full(values.shape, c, dtype=np.uint8)
            continue
        wins = values > best
        best[wins] = values[wins]
        label[wins] = c
    out[region] = label
    return out


def label_image(labels_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A (Z, Y, X) uint8 label array as an image with ``reference``'s size, spacing, origin and direction."""
    image = sitk.GetImageFromArray(labels_zyx.astype(np.uint8, copy=False))
    image.CopyInformation(reference)
    return image
