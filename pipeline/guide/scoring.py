"""How anatomical a coordinate frame is: the landmark spread of organ centroids across scans (pure numpy).

A frame is good when the same organ gets the same coordinates in every scan, compared with how far apart
different organs are. ``landmark_spread`` is that ratio (0 = perfect, lower is better; scale-free, so frames
in mm and in [0, 1] compare directly). Three frames are scored the same way: the learned guide
(``organ_coords_from_map``), the body box (``bodybox_organ_coords``) and raw scanner positions
(``scanner_organ_coords``).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage


def organ_centroids_zyx(label_zyx: np.ndarray) -> dict[int, np.ndarray]:
    """Centroid of each organ present in a label volume: {label value: (3,) float64 voxel index (z, y, x)}.

    label_zyx: (D, H, W) integer labels, 0 = background.
    """
    label = np.asarray(label_zyx)
    present = [int(v) for v in np.unique(label) if v != 0]
    centres = ndimage.center_of_mass(np.ones(label.shape), label, present) if present else []
    return {v: np.asarray(c, dtype=np.float64) for v, c in zip(present, centres)}


def organ_coords_from_map(coords_czyx: np.ndarray, label_zyx: np.ndarray) -> dict[int, np.ndarray]:
    """Mean predicted coordinate over each organ's voxels: {label: (C,) float64}.

    coords_czyx: (C, D, H, W) per-voxel coordinates (e.g. ``predict_coords`` output); label_zyx: (D, H, W).
    """
    coords, label = np.asarray(coords_czyx), np.asarray(label_zyx)
    if coords.shape[1:] != label.shape:
        raise ValueError(f"coords_czyx {coords.shape} and label_zyx {label.shape} must share (D, H, W)")
    present = [int(v) for v in np.unique(label) if v != 0]
    return {v: np.array([ndimage.mean(c, label, v) for c in coords], dtype=np.float64) for v in present}


def bodybox_organ_coords(label_zyx: np.ndarray, mask_zyx: np.ndarray) -> dict[int, np.ndarray]:
    """Baseline frame: organ centroids normalized to the body mask's bounding box, (z, y, x) in [0, 1]
    (0 at the box's first voxel, 1 at its last; the whole volume when the mask is empty)."""
    mask = np.asarray(mask_zyx) > 0
    if mask.shape != np.shape(label_zyx):
        raise ValueError(f"mask_zyx {mask.shape} and label_zyx {np.shape(label_zyx)} must have one shape")
    if mask.any():
        nz = np.argwhere(mask)
        first, last = nz.min(axis=0), nz.max(axis=0)
    else:
        first, last = np.zeros(3), np.asarray(mask.shape) - 1
    span = np.maximum(last - first, 1).astype(np.float64)
    return {k: (c - first) / span for k, c in organ_centroids_zyx(label_zyx).items()}


def scanner_organ_coords(label_zyx: np.ndarray, spacing_zyx_mm, origin_zyx_mm=(0.0, 0.0, 0.0)) -> dict[int, np.ndarray]:
    """Baseline frame: organ centroids in scanner mm, ``origin_zyx_mm + index * spacing_zyx_mm`` (z, y, x)."""
    spacing, origin = np.asarray(spacing_zyx_mm, float), np.asarray(origin_zyx_mm, float)
    return {k: origin + c * spacing for k, c in organ_centroids_zyx(label_zyx).items()}


def _organ_sets(coords_by_volume: list[dict[int, np.ndarray]], caller: str) -> dict[int, np.ndarray]:
    """{organ: (n_volumes, C) coordinates} of the organs seen in >= 2 volumes; ValueError if < 2 organs."""
    seen: dict[int, list[np.ndarray]] = {}
    for coords in coords_by_volume:
        for organ, c in coords.items():
            seen.setdefault(int(organ), []).append(np.asarray(c, dtype=np.float64))
    kept = {o: np.stack(cs) for o, cs in sorted(seen.items()) if len(cs) >= 2}
    if len(kept) < 2:
        raise ValueError(f"{caller} needs >= 2 organs seen in >= 2 volumes each, got {len(kept)} "
                         f"(organs and volume counts: { {o: len(c) for o, c in seen.items()} })")
    return kept


def landmark_spread(coords_by_volume: list[dict[int, np.ndarray]]) -> float:
    """Mean over organs of the RMS distance of its coordinates to their mean across volumes, divided by the
    mean distance between different organs' mean coordinates. Unitless, >= 0, lower is better.

    coords_by_volume: one {organ label: (C,) coordinate} dict per volume. Organs seen in fewer than 2
    volumes are skipped; at least 2 organs must remain (else ValueError).
    """
    kept = _organ_sets(coords_by_volume, "landmark_spread")
    means = {o: pts.mean(axis=0) for o, pts in kept.items()}
    rms = [np.sqrt(np.mean(np.sum((pts - means[o]) ** 2, axis=1))) for o, pts in kept.items()]
    between = [np.linalg.norm(means[a] - means[b]) for a, b in itertools.combinations(means, 2)]
    denom = float(np.mean(between))
    if denom <= 0:
        raise ValueError("all organs have the same mean coordinate: the frame carries no position")
    return float(np.mean(rms) / denom)


def landmark_spread_per_axis(coords_by_volume: list[dict[int, np.ndarray]]) -> np.ndarray:
    """(C,) the spread of each coordinate axis alone: mean over organs of the RMS deviation along the axis,
    over the mean |difference| of different organs' means along it. Shows what the scale-free
    ``landmark_spread`` can hide: a frame whose z barely separates organs (z collapsed) scores well overall
    but gets a large z ratio here. Same organ rules as ``landmark_spread``."""
    kept = _organ_sets(coords_by_volume, "landmark_spread_per_axis")
    means = np.stack([pts.mean(axis=0) for pts in kept.values()])
    rms = np.stack([np.sqrt(np.mean((pts - pts.mean(axis=0)) ** 2, axis=0)) for pts in kept.values()])
    between = np.stack([np.abs(means[a] - means[b]) for a, b in itertools.combinations(range(len(means)), 2)])
    return rms.mean(axis=0) / np.maximum(between.mean(axis=0), 1e-12)


def slice_means(coord_zyx: np.ndarray, mask_zyx: np.ndarray | None = None) -> np.ndarray:
    """(D,) mean of one coordinate channel (D, H, W) over each axial slice's body voxels; slices without body
    voxels are dropped (so the result may be shorter than D)."""
    coord = np.asarray(coord_zyx, dtype=np.float64)
    if mask_zyx is None:
        return coord.reshape(coord.shape[0], -1).mean(axis=1)
    mask = np.asarray(mask_zyx) > 0
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    sums = np.where(mask, coord, 0.0).reshape(coord.shape[0], -1).sum(axis=1)
    return sums[counts > 0] / counts[counts > 0]


def monotonic_fraction(values_along_z) -> float:
    """Fraction of consecutive values that increase (``v[k+1] > v[k]``), in [0, 1]; needs >= 2 values.

    For the cranio-caudal guide channel's ``slice_means`` along z (inferior -> superior) a consistent frame
    gives a value near 1 (or near 0: the distance loss fixes the frame only up to a reflection).
    """
    values = np.asarray(values_along_z, dtype=np.float64).reshape(-1)
    if values.size < 2:
        raise ValueError(f"monotonic_fraction needs >= 2 values, got {values.size}")
    return float(np.mean(np.diff(values) > 0))


def organ_separation_mm(coords_by_volume: list[dict[int, np.ndarray]], scale_mm=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(C,) how far apart a frame puts different organs, per axis, in mm: the mean over volumes and over pairs
    of organs present in the same volume of ``|c_a - c_b| * scale_mm``. Within one volume only, so scan origins
    cancel. With scanner-mm organ centroids and scale 1 this is the anatomy's separation; with a guide's
    coordinates and its ``axis_scale_mm`` the learned frame's. Their ratio per axis shows a compressed axis
    (ratio << 1) that ``landmark_spread`` cannot. ValueError without any volume holding 2 organs."""
    scale = np.asarray(scale_mm, dtype=np.float64)
    diffs = [np.abs(np.asarray(c[a], np.float64) - np.asarray(c[b], np.float64)) * scale
             for c in coords_by_volume for a, b in itertools.combinations(sorted(c), 2)]
    if not diffs:
        raise ValueError("organ_separation_mm needs a volume with >= 2 organs")
    return np.mean(diffs, axis=0)
