"""Scoring a coordinate guide (3-D or body-part regression) on labelled and unlabelled real or phantom scans.

Per dataset: the landmark spread of organ centroids across scans for three frames (learned, body box,
scanner mm), overall and per axis; the learned frame's mm between organ means per axis against the anatomy's
(a compressed axis shows as a ratio << 1); and, without labels, the consistency of the frame when the same scan
is cropped and resampled differently (mm per axis, against the body box's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.conditioning import bodybox_coords
from pipeline.data.patches import VolumeRef
from pipeline.guide.consistency import rms_mm, scan_consistency_mm
from pipeline.guide.inference import guide_scale_mm, predict_coords
from pipeline.guide.scoring import (landmark_spread, landmark_spread_per_axis, monotonic_fraction,
                                    organ_centroids_zyx, organ_separation_mm, slice_means)

FRAME_METRICS = {"learned": "guide_landmark_spread", "bodybox": "guide_landmark_spread_bodybox",
                 "scanner": "guide_landmark_spread_scanner"}


def coords_at_centroids(coords_czyx: np.ndarray, label_zyx: np.ndarray) -> dict[int, np.ndarray]:
    """{organ label: (C,) coordinate read at the voxel nearest to the organ's centroid}."""
    out = {}
    for organ, centre in organ_centroids_zyx(label_zyx).items():
        k, j, i = np.clip(np.round(centre).astype(int), 0, np.asarray(label_zyx.shape) - 1)
        out[organ] = np.asarray(coords_czyx[:, k, j, i], dtype=np.float64)
    return out


def _mask(ref: VolumeRef) -> np.ndarray:
    mask = ref.mask()
    return np.ones(ref.shape_zyx, bool) if mask is None else np.asarray(mask) > 0


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
        maps["learned"] = predict_coords(guide, volume, body_bbox_zyx=ref.body_bbox_zyx())
    return maps


def _suffixed(metrics: dict[str, float], name: str | None) -> dict[str, float]:
    return metrics if name is None else {f"{k}.{name}": v for k, v in metrics.items()}


def score_frames(refs: list[VolumeRef], guide, name: str | None = None) -> dict[str, float]:
    """Landmark statistics over labelled ``refs`` (metric names end in ``.name`` when given):
    ``guide_landmark_spread`` (learned), ``..._bodybox``, ``..._scanner``, each also per axis (``..._z`` ...);
    ``guide_spread_vs_bodybox`` (learned over body box, the goal's ratio; per axis too); the learned frame's mm
    between organs per axis ``guide_organ_mm_{z,y,x}``, the anatomy's ``guide_organ_mm_anatomy_{z,y,x}`` and
    their ratio ``guide_organ_mm_ratio_{z,y,x}`` (1 = physically scaled, << 1 = a compressed axis)."""
    per_frame: dict[str, list[dict]] = {}
    scales = []
    for ref in refs:
        label = np.asarray(ref.label())
        for frame, cmap in frame_maps(ref, guide).items():
            per_frame.setdefault(frame, []).append(coords_at_centroids(cmap, label))
        if guide is not None:
            scales.append(guide_scale_mm(guide, _mask(ref), ref.spacing_zyx_mm))
    out = {FRAME_METRICS[k]: landmark_spread(v) for k, v in per_frame.items()}
    per_axis = {k: landmark_spread_per_axis(v) for k, v in per_frame.items()}
    for k, v in per_axis.items():   # per axis: a collapsed axis shows up here (see landmark_spread_per_axis)
        out.update({f"{FRAME_METRICS[k]}_{axis}": float(r) for axis, r in zip("zyx", v)})
    if guide is not None:
        out["guide_spread_vs_bodybox"] = out["guide_landmark_spread"] / out["guide_landmark_spread_bodybox"]
        out.update({f"guide_spread_vs_bodybox_{a}": float(r)
                    for a, r in zip("zyx", per_axis["learned"] / per_axis["bodybox"])})
        learned_mm = organ_separation_mm(per_frame["learned"], np.mean(scales, axis=0))
        anatomy_mm = organ_separation_mm(per_frame["scanner"])
        for a, lm, am in zip("zyx", learned_mm, anatomy_mm):
            out.update({f"guide_organ_mm_{a}": float(lm), f"guide_organ_mm_anatomy_{a}": float(am),
                        f"guide_organ_mm_ratio_{a}": float(lm / max(am, 1e-9))})
    return _suffixed(out, name)


def consistency_scores(refs: list[VolumeRef], guide, n_views: int, seed: int = 0,
                       name: str | None = None) -> dict[str, float]:
    """Label-free: RMS mm by which the learned frame (``guide_consistency_mm``) and the body box
    (``guide_consistency_mm_bodybox``) disagree with themselves over ``n_views`` re-cropped, re-sampled views
    of each scan; overall (3-D) and per axis (``_z``, ``_y``, ``_x``)."""
    if n_views < 1 or guide is None:
        return {}
    rng = np.random.default_rng(seed)
    found: dict[str, list[np.ndarray]] = {"learned": [], "bodybox": []}
    for ref in refs:
        mask = _mask(ref)
        bbox = ref.body_bbox_zyx()

        def predict(volume_hu, full=ref.shape_zyx, box=bbox):
            return predict_coords(guide, volume_hu, body_bbox_zyx=box if volume_hu.shape == tuple(full) else None)

        d = scan_consistency_mm(predict, ref.image(), ref.spacing_zyx_mm, mask,
                                guide_scale_mm(guide, mask, ref.spacing_zyx_mm), rng, n_views)
        for k in found:
            found[k].append(d[k])
    out = {}
    for frame, key in (("learned", "guide_consistency_mm"), ("bodybox", "guide_consistency_mm_bodybox")):
        per_axis = rms_mm(found[frame])
        out[key] = float(np.sqrt(np.sum(per_axis ** 2)))
        out.update({f"{key}_{a}": float(v) for a, v in zip("zyx", per_axis)})
    return _suffixed(out, name)


def craniocaudal_check(refs: list[VolumeRef], guide) -> dict[str, float]:
    """On real CT: fraction of consecutive axial slices whose mean z coordinate rises (1 = monotonic)."""
    out = {}
    for ref in refs:
        coords = predict_coords(guide, np.asarray(ref.image()), body_bbox_zyx=ref.body_bbox_zyx())
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
