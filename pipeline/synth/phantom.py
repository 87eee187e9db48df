"""`make_phantom`: one synthetic CT (int16 HU, uint8 BTCV labels) with its ground-truth metadata.

Deterministic per (seed, index): every random draw comes from ``np.random.default_rng([seed, index])`` in a fixed
order, so the same inputs give byte-identical arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pipeline.labels import LABEL_TO_ORGAN, NUM_ORGANS
from pipeline.synth.anatomy import VERTEBRAE, Patient, body_to_world, sample_patient
from pipeline.synth.body import paint_muscles, paint_table, paint_trunk, sample_geometry
from pipeline.synth.canvas import Canvas
from pipeline.synth.organs import (_Jitter, paint_pelvic_organs, paint_retroperitoneum, paint_spleen,
                                   paint_thorax, paint_upper_abdomen)
from pipeline.synth.scanners import (ScannerProfile, acquire, sample_protocol, sample_tissue_hu,
                                     scan_spacing_zyx_mm)
from pipeline.synth.skeleton import (paint_pelvis, paint_ribs, paint_spine, paint_sternum_clavicles,
                                     pelvis_points, vertebra_centre)


@dataclass
class Phantom:
    """One phantom CT. Arrays are (z, y, x) on a canonical LPS grid (identity direction, z superior)."""

    image_hu_zyx: np.ndarray                      # int16 HU
    label_zyx: np.ndarray | None                  # uint8 BTCV labels 0..13, None if with_labels=False
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]     # world LPS position of voxel (0, 0, 0)
    scanner: ScannerProfile
    fov: str
    meta: dict                                    # JSON-able ground truth (see docs/phantom.md)


def case_id(seed: int, index: int) -> str:
    """Case id ``phantom_<seed>_<index:04d>``."""
    return f"phantom_{seed}_{index:04d}"


def fov_range_z_mm(fov: str, p: Patient, g: dict, rng: np.random.Generator) -> tuple[float, float]:
    """Body-frame z range (low, high) in mm a protocol covers, with random start/stop jitter."""
    above_apex = g["apex_z"] + rng.uniform(10.0, 40.0)
    above_dome = g["dome_r_z"] + rng.uniform(10.0, 40.0)
    below_symph = -rng.uniform(10.0, 50.0)
    ranges = {
        "chest": (p.zc("T12") + rng.uniform(-10.0, 25.0), above_apex),
        "abdomen_pelvis": (below_symph, above_dome),
        "chest_abdomen_pelvis": (below_symph, above_apex),
        "upper_abdomen": (g["crest_z"] - rng.uniform(0.0, 30.0), above_dome),
    }
    return ranges[fov]


def _grid(p: Patient, z_range: tuple[float, float], spacing_zyx_mm, rng: np.random.Generator):
    """Scanner grid: (shape_zyx, origin_xyz_mm, reconstruction radius mm), FOV centred on the isocentre."""
    sz, sy, sx = spacing_zyx_mm
    zs = np.linspace(*z_range, 32)
    width = 2.0 * float(np.max(p.profile(zs, "half_width"))) + 2.0 * abs(float(p.offset_xyz_mm[0]))
    diameter = float(np.clip(width + rng.uniform(40.0, 100.0), 300.0, 500.0))
    nx, ny = int(np.ceil(diameter / sx)), int(np.ceil(diameter / sy))
    nz = int(np.floor((z_range[1] - z_range[0]) / sz)) + 1
    origin = (round(-(nx - 1) / 2 * sx, 3), round(-(ny - 1) / 2 * sy, 3),
              round(z_range[0] + float(p.offset_xyz_mm[2]), 2))
    return (nz, ny, nx), origin, diameter / 2.0


def _paint(canvas: Canvas, p: Patient, g: dict, tissue: dict, rng: np.random.Generator,
           origin_xyz_mm, spacing_zyx_mm) -> dict:
    """Paint every structure in a fixed order (later ones overwrite); returns body-frame landmarks."""
    paint_trunk(canvas, p, g, tissue, rng)
    paint_table(canvas, p, tissue, origin_xyz_mm, spacing_zyx_mm)
    paint_muscles(canvas, p, g, tissue)
    paint_spine(canvas, p, tissue)
    paint_ribs(canvas, p, tissue)
    paint_sternum_clavicles(canvas, p, tissue)
    paint_pelvis(canvas, p, g, tissue)
    jitter = _Jitter(rng)
    paint_upper_abdomen(canvas, p, g, tissue, jitter)
    marks = paint_retroperitoneum(canvas, p, g, tissue, jitter)
    paint_spleen(canvas, p, g, tissue, jitter)
    marks.update(paint_thorax(canvas, p, g, tissue, jitter))
    pelvis = pelvis_points(p, g)
    paint_pelvic_organs(canvas, p, g, tissue, jitter, pelvis["pubic_symphysis"][1])
    marks.update(pelvis)
    hw = float(p.profile(g["apex_z"], "half_width"))
    marks.update({"lung_apex_right": (-0.45 * hw, 0.0, g["apex_z"]), "lung_apex_left": (0.45 * hw, 0.0, g["apex_z"]),
                  "diaphragm_dome_right": (-0.45 * g["dome_half_width"], 0.0, g["dome_r_z"]),
                  "diaphragm_dome_left": (0.45 * g["dome_half_width"], 0.0, g["dome_l_z"])})
    return marks


def _landmarks_world(p: Patient, marks: dict, frame: dict) -> dict:
    """World LPS landmarks: vertebra centres, body centre line, named points."""
    names = list(marks)
    pts = body_to_world(np.array([marks[n] for n in names], np.float64), frame)
    vert = body_to_world(np.array([vertebra_centre(p, n) for n in VERTEBRAE]), frame)
    line = body_to_world(np.array([(0.0, 0.0, p.zc(n)) for n in VERTEBRAE]), frame)
    r = lambda a: [round(float(v), 2) for v in a]  # noqa: E731
    return {"vertebrae": {n: r(v) for n, v in zip(VERTEBRAE, vert)},
            "body_centre_line": {n: r(v) for n, v in zip(VERTEBRAE, line)},
            **{n: r(v) for n, v in zip(names, pts)}}


def _organ_stats(label_zyx: np.ndarray, spacing_zyx_mm, origin_xyz_mm) -> dict:
    """Per organ in the FOV: voxel count and world centroid (mm)."""
    flat = np.flatnonzero(label_zyx)
    lab = label_zyx.ravel()[flat]
    counts = np.bincount(lab, minlength=NUM_ORGANS + 1)
    kji = np.unravel_index(flat, label_zyx.shape)
    sums = [np.bincount(lab, weights=idx, minlength=NUM_ORGANS + 1) for idx in kji]
    out = {}
    for k in range(1, NUM_ORGANS + 1):
        if counts[k]:
            xyz = [origin_xyz_mm[a] + spacing_zyx_mm[2 - a] * sums[2 - a][k] / counts[k] for a in range(3)]
            out[LABEL_TO_ORGAN[k]] = {"voxels": int(counts[k]), "centroid_xyz_mm": [round(float(v), 2) for v in xyz]}
    return out


def make_phantom(seed: int, index: int, spacing_mm: float | None = None, with_labels: bool = True, *,
                 scanner: str | None = None, fov: str | None = None, contrast: str | None = None) -> Phantom:
    """Synthesize phantom ``index`` of corpus ``seed``.

    Args:
        seed, index: non-negative ints; the phantom is a pure function of them (and the arguments below).
        spacing_mm: exact isotropic spacing (mm); None = the scanner profile's spacing around a 3 mm nominal.
        with_labels: return the label volume (it is always painted; the meta is identical either way).
        scanner, fov, contrast: force a profile name (``scanners.PROFILES``), field of view (``scanners.FOVS``)
            or contrast phase (``scanners.CONTRAST_PHASES``); the random stream is unchanged by forcing.
    Raises:
        ValueError: negative seed/index, bad spacing, unknown scanner/fov/contrast.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    profile, fov_name, phase = sample_protocol(rng, scanner, fov, contrast)
    spacing = scan_spacing_zyx_mm(profile, spacing_mm)
    patient = sample_patient(rng)
    geo = sample_geometry(rng, patient)
    tissue = sample_tissue_hu(rng, phase)
    z_range = fov_range_z_mm(fov_name, patient, geo, rng)
    shape, origin, radius = _grid(patient, z_range, spacing, rng)
    frame = patient.frame()
    canvas = Canvas(shape, spacing, origin, frame)
    marks = _paint(canvas, patient, geo, tissue, rng, origin, spacing)
    image = acquire(canvas.hu, rng, profile, spacing, radius)
    meta = {
        "case_id": case_id(seed, index), "seed": seed, "index": index,
        "fov": {"name": fov_name, "z_start_mm": origin[2],
                "z_stop_mm": round(origin[2] + (shape[0] - 1) * spacing[0], 2)},
        "scanner": {**profile.as_dict(), "slice_thickness_mm": spacing[0], "spacing_zyx_mm": list(spacing)},
        "contrast_phase": phase,
        "geometry": {"shape_zyx": list(shape), "spacing_zyx_mm": list(spacing), "origin_xyz_mm": list(origin),
                     "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "reconstruction_radius_mm": round(radius, 2)},
        "patient": {"height_scale": round(patient.height_scale, 4), "habitus": round(patient.habitus, 4),
                    "tissue_hu": tissue, **{k: round(float(v), 2) for k, v in geo.items()}},
        "landmarks": _landmarks_world(patient, marks, frame),
        "organs": _organ_stats(canvas.label, spacing, origin),
        "frame": frame,
    }
    return Phantom(image, canvas.label if with_labels else None, spacing, origin, profile, fov_name, meta)
