"""Label-free consistency of a coordinate frame on real scans (pure numpy).

The same scan, cropped and resampled differently, must give every physical point the same coordinate. A
*view* is a sub-box of the scan (40-100 % of its extent per axis) resampled at its own spacing (0.75-1.5 x the
scan's per axis); the frame is computed on the whole scan and on each view, and at the view's body voxels the
two are compared in mm (coordinate difference times the frame's mm per unit, per axis). 0 mm = the frame does
not depend on the field of view; the body-box frame, whose box moves with every crop, is the baseline.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from pipeline.data.conditioning import bodybox_coords
from pipeline.data.inputs import PAD_HU, body_bbox_zyx
from pipeline.guide.crops import resample_crop

#: per axis, the share of the scan's extent a view covers (uniform)
VIEW_EXTENT_FRACTION = (0.4, 1.0)
#: per axis, a view's spacing as a factor of the scan's (uniform)
VIEW_SPACING_FACTOR = (0.75, 1.5)


def sample_views(shape_zyx, spacing_zyx_mm, rng: np.random.Generator, n_views: int,
                 extent_fraction=VIEW_EXTENT_FRACTION, spacing_factor=VIEW_SPACING_FACTOR,
                 min_size: int = 8) -> list[dict[str, np.ndarray]]:
    """``n_views`` random views of a (D, H, W) scan at ``spacing_zyx_mm``: dicts of ``origin_zyx_mm``,
    ``spacing_zyx_mm`` (3,) float64 (volume frame: voxel k at k * spacing) and ``size_zyx`` (3,) int (at least
    ``min_size``), each lying inside the scan."""
    spacing = np.asarray(spacing_zyx_mm, dtype=np.float64)
    extent_mm = (np.asarray(shape_zyx) - 1) * spacing
    views = []
    for _ in range(n_views):
        view_spacing = spacing * rng.uniform(*spacing_factor, 3)
        view_extent = extent_mm * rng.uniform(*extent_fraction, 3)
        size = np.maximum(np.floor(view_extent / view_spacing).astype(int) + 1, min_size)
        span = (size - 1) * view_spacing
        origin = rng.uniform(0.0, 1.0, 3) * np.maximum(extent_mm - span, 0.0)
        views.append({"origin_zyx_mm": origin, "spacing_zyx_mm": view_spacing, "size_zyx": size})
    return views


def read_map_at_mm(coords_czyx: np.ndarray, spacing_zyx_mm, points_mm: np.ndarray) -> np.ndarray:
    """(N, C) values of a (C, D, H, W) map at physical points (N, 3) mm of its volume frame: trilinear, edges
    clamped."""
    index = (np.asarray(points_mm, np.float64) / np.asarray(spacing_zyx_mm, np.float64)).T
    return np.stack([ndimage.map_coordinates(np.asarray(c, np.float32), index, order=1, mode="nearest")
                     for c in coords_czyx], axis=1).astype(np.float64)


def view_disagreement_mm(ref_coords_czyx: np.ndarray, ref_spacing_zyx_mm, view_coords_czyx: np.ndarray,
                         view_origin_zyx_mm, view_spacing_zyx_mm, scale_mm, view_mask_zyx=None,
                         max_points: int = 4096, rng: np.random.Generator | None = None) -> np.ndarray:
    """(N, 3) signed disagreement in mm, per axis (z, y, x), between a view's coordinates and the whole scan's
    at the same physical points: ``scale_mm * (view - scan)``.

    ref_coords_czyx: (3, D, H, W) of the whole scan; view_coords_czyx: (3, d, h, w) of the view, whose voxel m
    lies at ``view_origin + m * view_spacing`` mm. Points: the view's voxels inside ``view_mask_zyx`` (all
    without a mask), at most ``max_points`` of them drawn with ``rng``. scale_mm: (3,) mm per coordinate unit.
    """
    view = np.asarray(view_coords_czyx)
    select = np.ones(view.shape[1:], bool) if view_mask_zyx is None else np.asarray(view_mask_zyx) > 0
    idx = np.argwhere(select)
    if len(idx) == 0:
        return np.zeros((0, 3))
    if len(idx) > max_points:
        idx = idx[(rng or np.random.default_rng(0)).choice(len(idx), max_points, replace=False)]
    points_mm = np.asarray(view_origin_zyx_mm) + idx * np.asarray(view_spacing_zyx_mm)
    ref = read_map_at_mm(ref_coords_czyx, ref_spacing_zyx_mm, points_mm)
    own = view[:, idx[:, 0], idx[:, 1], idx[:, 2]].T.astype(np.float64)
    return (own - ref) * np.asarray(scale_mm, np.float64)


def rms_mm(disagreements: list[np.ndarray]) -> np.ndarray:
    """(3,) RMS over all points of (N, 3) disagreements; NaN when there are none."""
    d = np.concatenate([np.zeros((0, 3))] + list(disagreements))
    return np.sqrt(np.mean(d ** 2, axis=0)) if len(d) else np.full(3, np.nan)


def bodybox_scale_mm(mask_zyx: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    """(3,) mm per body-box unit: the body's extent along each axis (at least one voxel)."""
    box = body_bbox_zyx(mask_zyx)
    return np.array([max(b - a, 1) for a, b in box], np.float64) * np.asarray(spacing_zyx_mm, np.float64)


def scan_consistency_mm(predict: Callable[[np.ndarray], np.ndarray], volume_hu_zyx: np.ndarray,
                        spacing_zyx_mm, mask_zyx: np.ndarray, scale_mm, rng: np.random.Generator,
                        n_views: int = 4) -> dict[str, np.ndarray]:
    """Disagreement of a frame with itself over ``n_views`` random views of one scan, and of the body box.

    predict: HU volume (D, H, W) -> (3, D, H, W) coordinates (e.g. ``predict_coords`` of a guide);
    scale_mm: (3,) its mm per unit (``axis_scale_mm``). mask_zyx: the scan's body mask (points are body voxels).
    Returns {"learned": (N, 3), "bodybox": (N, 3)} signed mm per axis (pass lists of them to ``rms_mm``).
    """
    spacing = np.asarray(spacing_zyx_mm, np.float64)
    mask = np.asarray(mask_zyx) > 0
    ref = predict(np.asarray(volume_hu_zyx))
    ref_box = bodybox_coords(mask.shape, body_bbox_zyx(mask), (0, 0, 0))
    box_scale = bodybox_scale_mm(mask, spacing)
    out: dict[str, list[np.ndarray]] = {"learned": [], "bodybox": []}
    for v in sample_views(mask.shape, spacing, rng, n_views):
        args = (spacing, v["origin_zyx_mm"], v["spacing_zyx_mm"], v["size_zyx"])
        hu = resample_crop(volume_hu_zyx, *args, PAD_HU)
        vmask = resample_crop(mask.astype(np.uint8), *args, 0, order=0) > 0.5
        if not vmask.any():
            continue
        seed = int(rng.integers(2 ** 63))                       # the same points for both frames
        out["learned"].append(view_disagreement_mm(ref, spacing, predict(hu.astype(np.int16)), v["origin_zyx_mm"],
                                                   v["spacing_zyx_mm"], scale_mm, vmask,
                                                   rng=np.random.default_rng(seed)))
        box = bodybox_coords(vmask.shape, body_bbox_zyx(vmask), (0, 0, 0))
        out["bodybox"].append(view_disagreement_mm(ref_box, spacing, box, v["origin_zyx_mm"], v["spacing_zyx_mm"],
                                                   box_scale, vmask, rng=np.random.default_rng(seed)))
    return {k: np.concatenate([np.zeros((0, 3))] + v) for k, v in out.items()}
