"""Trunk of the phantom: skin, subcutaneous fat, muscle wall, body cavities, lungs, diaphragm, muscles, table.

All positions are body-frame mm (see :mod:`pipeline.synth.anatomy`); masks are functions of body-frame X, Y, Z
arrays (float32, mm) evaluated by a :class:`~pipeline.synth.canvas.Canvas` inside a sub-box.
"""

from __future__ import annotations

import numpy as np

from pipeline.synth.anatomy import Patient
from pipeline.synth.canvas import Canvas, capsule, ellipsoid, paint_tube, smooth_noise

SKIN_MM = 2.5
WALL_MM = 13.0      # muscle wall (abdominal wall / intercostal muscles) under the subcutaneous fat


def sample_geometry(rng: np.random.Generator, p: Patient) -> dict[str, float]:
    """Landmark heights (body-frame z, mm) that several structures share: diaphragm domes, lung apex, pelvis."""
    dome_r = p.zc("T9") + rng.uniform(0.0, 20.0)
    return {
        "dome_r_z": dome_r, "dome_l_z": dome_r - rng.uniform(10.0, 20.0),
        "apex_z": p.vertebra_z_mm["T1"][1] + rng.uniform(5.0, 25.0),
        "femoral_head_z": rng.uniform(10.0, 25.0), "crest_z": p.zc("L4") + rng.uniform(-10.0, 10.0),
        "dome_half_width": float(p.profile(dome_r, "half_width")),
        "dome_half_depth_post": float(p.profile(dome_r, "half_depth_post")),
        "dome_half_depth_ant": float(p.profile(dome_r, "half_depth_ant")),
    }


def trunk_depth(X: np.ndarray, Y: np.ndarray, Z: np.ndarray, p: Patient) -> tuple[np.ndarray, np.ndarray]:
    """(depth below the skin in mm, positive inside; v = Y / half depth) for the elliptic trunk section.

    The depth is the implicit ellipse function over its gradient: exact on the surface, close inside.
    """
    hw = p.profile(Z, "half_width")
    hd = np.where(Y > 0, p.profile(Z, "half_depth_post"), p.profile(Z, "half_depth_ant"))
    u, v = X / hw, Y / hd
    r = np.sqrt(u * u + v * v) + np.float32(1e-6)
    grad = np.sqrt((u / hw) ** 2 + (v / hd) ** 2) / r + np.float32(1e-6)
    return (1.0 - r) / grad, v


def fat_thickness(Z: np.ndarray, v: np.ndarray, p: Patient) -> np.ndarray:
    """Subcutaneous fat (mm): the profile's value, thicker anteriorly, thinner over the back."""
    return p.profile(Z, "fat") * (1.0 + 0.4 * np.clip(-v, 0, 1)) * (1.0 - 0.5 * np.clip(v, 0, 1))


def cavity_mask(X, Y, Z, p: Patient, inset_mm: float = 0.0) -> np.ndarray:
    """Inside the muscle wall (thoracic, abdominal or pelvic cavity), ``inset_mm`` further in."""
    depth, v = trunk_depth(X, Y, Z, p)
    return depth >= SKIN_MM + fat_thickness(Z, v, p) + WALL_MM + inset_mm


def diaphragm_z(X: np.ndarray, Y: np.ndarray, g: dict) -> np.ndarray:
    """Height (mm) of the diaphragm surface over (X, Y): two domes, the right higher, deep posterior recesses."""
    xr = X / (0.5 * g["dome_half_width"])
    top = np.maximum(g["dome_r_z"] - 30.0 * (xr + 0.9) ** 2, g["dome_l_z"] - 30.0 * (xr - 0.9) ** 2)
    yp = np.where(Y > 0, Y / g["dome_half_depth_post"], Y / g["dome_half_depth_ant"])
    return top - 110.0 * np.clip(yp - 0.05, 0, None) ** 2 - 30.0 * np.clip(-yp - 0.1, 0, None) ** 2


def lung_mask(X, Y, Z, p: Patient, g: dict) -> np.ndarray:
    """Both lungs, given points already inside the cavity: above the diaphragm, below the apices, outside
    the mediastinum (a midline band, wider behind the heart-free posterior part around the spine)."""
    hw = p.profile(Z, "half_width")
    side = np.abs(X)
    top = g["apex_z"] - 70.0 * ((side - 0.45 * hw) / (0.45 * hw)) ** 2
    spine_y = p.profile(Z, "spine_y")
    mediastinum = (side < 18.0) | ((side < 35.0) & (Y > spine_y - 25.0))
    return (Z > diaphragm_z(X, Y, g)) & (Z < top) & ~mediastinum


def paint_trunk(canvas: Canvas, p: Patient, g: dict, tissue: dict, rng: np.random.Generator) -> None:
    """Skin, fat, muscle wall, cavity fillings (mediastinal fat, bowel and mesentery, neck), diaphragm, lungs."""
    box = tuple(slice(0, n) for n in canvas.shape_zyx)
    X, Y, Z = canvas.coords(box)
    depth, v = trunk_depth(X, Y, Z, p)
    fat_end = SKIN_MM + fat_thickness(Z, v, p)
    hu = canvas.hu
    hu[depth > 0] = tissue["muscle"]
    hu[(depth > 0) & (depth < fat_end)] = tissue["fat"]
    hu[(depth > 0) & (depth < SKIN_MM)] = tissue["skin"]
    cavity = depth >= fat_end + WALL_MM
    texture = smooth_noise(rng, canvas.shape_zyx, canvas.spacing_zyx_mm, 16.0)[cavity]
    Xc, Yc, Zc, vc = X[cavity], Y[cavity], Z[cavity], v[cavity]      # 1-D: cavity voxels only
    dz = diaphragm_z(Xc, Yc, g)
    fill = np.full(Xc.shape, tissue["muscle"], np.float32)           # neck and pelvic floor
    fill[(Zc > dz) & (Zc < g["apex_z"] + 15.0)] = tissue["fat"]        # mediastinum
    abdomen = (Zc <= dz - 6.0) & (Zc > g["femoral_head_z"] - 40.0)
    bowel = np.where(texture > 0.1, tissue["bowel"], np.where(texture < -1.4, tissue["gas"], tissue["fat"]))
    fill[abdomen] = bowel[abdomen]
    lungs = lung_mask(Xc, Yc, Zc, p, g)
    fill[lungs] = tissue["lung"] + 60.0 * np.clip(vc[lungs], 0, 1)    # dependent (posterior) density
    hu[cavity] = fill


def paint_muscles(canvas: Canvas, p: Patient, g: dict, tissue: dict) -> None:
    """Paraspinal muscles along the whole spine, psoas beside the lumbar spine, gluteal muscles."""
    muscle = tissue["muscle"]

    def under_fat(extra):
        def mask(X, Y, Z):
            depth, v = trunk_depth(X, Y, Z, p)
            return extra(X, Y, Z) & (depth >= SKIN_MM + fat_thickness(Z, v, p))
        return mask

    z_lo, z_hi = p.vertebra_z_mm["S1"][0], p.vertebra_z_mm["C7"][1]
    for s in (-1.0, 1.0):
        ys = np.array([p.profile(z, "spine_y") for z in (z_lo, p.zc("L3"), p.zc("T12"), p.zc("T6"), z_hi)])
        zs = np.array([z_lo, p.zc("L3"), p.zc("T12"), p.zc("T6"), z_hi])
        rad = np.array([28.0, 32.0, 26.0, 22.0, 18.0]) * p.habitus ** 0.5
        for k in range(len(zs) - 1):
            a = (s * 32.0, ys[k] + 45.0, zs[k])
            b = (s * 32.0, ys[k + 1] + 45.0, zs[k + 1])
            lo = np.minimum(a, b) - rad[k:k + 2].max()
            hi = np.maximum(a, b) + rad[k:k + 2].max()
            canvas.paint(lo, hi, under_fat(capsule(a, b, rad[k], rad[k + 1])), muscle)
        psoas = [(s * 22.0, p.profile(p.zc("T12"), "spine_y"), p.zc("T12")),
                 (s * 32.0, p.profile(p.zc("L3"), "spine_y") - 5.0, p.zc("L3")),
                 (s * 45.0, p.profile(p.zc("L5"), "spine_y") - 15.0, p.zc("L5")),
                 (s * 75.0, -25.0, g["femoral_head_z"] + 30.0), (s * 80.0, -30.0, g["femoral_head_z"] - 20.0)]
        paint_tube(canvas, psoas, [7.0, 17.0, 23.0, 22.0, 18.0], muscle)
        hw0 = float(p.profile(0.0, "half_width"))
        centre = (s * 0.62 * hw0, 65.0, g["femoral_head_z"] + 30.0)
        radii = (0.3 * hw0, 50.0, 90.0)
        canvas.paint(np.subtract(centre, radii), np.add(centre, radii), under_fat(ellipsoid(centre, radii)), muscle)


def paint_table(canvas: Canvas, p: Patient, tissue: dict, origin_xyz_mm, spacing_zyx_mm) -> float:
    """A curved carbon-fibre table under the patient (shells + foam core), in scanner space; returns its top y."""
    ny, nx = canvas.shape_zyx[1:]
    y = origin_xyz_mm[1] + spacing_zyx_mm[1] * np.arange(ny, dtype=np.float32)
    x = origin_xyz_mm[0] + spacing_zyx_mm[2] * np.arange(nx, dtype=np.float32)
    top = float(p.offset_xyz_mm[1] + p.half_depth_post_mm.max() + canvas.margin_mm + 12.0)
    curve = top - 30.0 * (x / 220.0) ** 2                     # edges curve up (towards anterior)
    rel = y[:, None] - curve[None, :]                         # (ny, nx) mm below the table surface
    inside = np.abs(x)[None, :] < 220.0
    shell = inside & (((rel >= 0) & (rel < 3.0)) | ((rel >= 33.0) & (rel < 36.0)))
    foam = inside & (rel >= 3.0) & (rel < 33.0)
    canvas.hu[:, foam] = tissue["table_foam"]
    canvas.hu[:, shell] = tissue["table_shell"]
    return top
