"""Scoring a coordinate guide on labelled volumes against the body-box and scanner frames.

For each organ, its centroid is found in every held-out volume and each frame's coordinate is read there;
``landmark_spread`` then says how consistently a frame places the same organ across patients (0 = perfect).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.patches import VolumeRef
from pipeline.data.conditioning import bodybox_coords
from pipeline.guide.inference import predict_coords
from pipeline.guide.scoring import (landmark_spread, landmark_spread_per_axis, monotonic_fraction,
                                    organ_centroids_zyx, slice_means)


def coords_at_centroids(coords_czyx: np.ndarray, label_zyx: np.ndarray) -> dict[int, np.ndarray]:
    """{organ label: (C,) coordinate read at the voxel nearest to the organ's centroid}."""
    out = {}
    for organ, centre in organ_centroids_zyx(label_zyx).items():
        k, j, i = np.clip(np.round(centre).astype(int), 0, np.asarray(label_zyx.shape) - 1)
        out[organ] = np.asarray(coords_czyx[:, k, j, i], dtype=np.float64)
    return out


def frame_maps(ref: VolumeRef, guide) -> dict[str, np.ndarray]:
    """The three frames of one volume as (3, D, H, W) maps: learned guide, body box, scanner mm (z, y, x)."""
    shape = ref.shape_zyx
    volume = np.asarray(ref.image())
    maps = {"bodybox": bodybox_coords(shape, ref.body_bbox_zyx(), (0, 0, 0))}
    origin_zyx = np.asarray(ref.origin_xyz_mm[::-1])
    spacing = np.asarray(ref.spacing_zyx_mm)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    maps["scanner"] = np.stack([origin_zyx[a] + grids[a] * spacing[a] for a in range(3)]).astype(np.float32)
    if guide is not None:
        maps["learned"] = predict_coords(guide, volume)
    return maps


def score_frames(refs: list[VolumeRef], guide) -> dict[str, float]:
    """``guide_landmark_spread`` (learned), ``..._bodybox`` and ``..._scanner`` over labelled ``refs``, and
    each per axis (``..._z``, ``..._y``, ``..._x``)."""
    per_frame: dict[str, list[dict]] = {}
    for ref in refs:
        label = np.asarray(ref.label())
        for name, cmap in frame_maps(ref, guide).items():
            per_frame.setdefault(name, []).append(coords_at_centroids(cmap, label))
    names = {"learned": "guide_landmark_spread", "bodybox": "guide_landmark_spread_bodybox",
             "scanner": "guide_landmark_spread_scanner"}
    out = {names[k]: landmark_spread(v) for k, v in per_frame.items()}
    for k, v in per_frame.items():   # per axis: a collapsed axis shows up here (see landmark_spread_per_axis)
        out.update({f"{names[k]}_{axis}": float(r) for axis, r in zip("zyx", landmark_spread_per_axis(v))})
    return out


def craniocaudal_check(refs: list[VolumeRef], guide) -> dict[str, float]:
    """On real CT: fraction of consecutive axial slices whose mean z coordinate rises (1 = monotonic)."""
    out = {}
    for ref in refs:
        coords = predict_coords(guide, np.asarray(ref.image()))
        mask = ref.mask()
        means = slice_means(coords[0], None if mask is None else np.asarray(mask))
        out[f"guide_cc_monotonic.{ref.item_id}"] = monotonic_fraction(means)
    return out


def coordinate_png(ref: VolumeRef, guide, path: str | Path) -> Path:
    """Coronal and axial slices of the three coordinate channels of each frame, one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    maps = frame_maps(ref, guide)
    fig = Figure(figsize=(9, 3 * len(maps)))
    axes = fig.subplots(len(maps), 3, squeeze=False)
    y_mid = ref.shape_zyx[1] // 2
    for row, (name, cmap) in enumerate(maps.items()):
        for c, axis in enumerate("zyx"):
            ax = axes[row, c]
            ax.imshow(cmap[c, :, y_mid, :], origin="lower", cmap="viridis")
            ax.set_title(f"{name}: {axis} (coronal)", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return Path(path)
