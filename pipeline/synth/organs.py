"""The 13 BTCV organs and their unlabelled neighbours (heart, trachea, duodenum, bladder, renal and iliac vessels).

Positions are tied to the skeleton (vertebral levels, spine AP position, trunk size) with per-patient jitter
of position (~6 mm) and size (~8 %). Left and right kidney / adrenal share the same HU draw, and liver,
spleen, pancreas and kidneys overlap in HU without contrast: only shape, context and position separate them.
"""

from __future__ import annotations

import numpy as np

from pipeline.labels import ORGAN_TO_LABEL as LAB
from pipeline.synth.anatomy import VERTEBRAE, Patient
from pipeline.synth.body import cavity_mask, diaphragm_z
from pipeline.synth.canvas import Canvas, ellipsoid, ellipsoid_bounds, paint_tube, rotation_zyx


class _Jitter:
    """Per-organ random shift (mm) and size scale, drawn in a fixed order for determinism."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def shift(self, sd_mm: float = 6.0) -> np.ndarray:
        return self.rng.normal(0.0, sd_mm, 3)

    def scale(self, sd: float = 0.08) -> float:
        return float(np.clip(self.rng.normal(1.0, sd), 0.8, 1.25))


def _vb(p: Patient, name: str) -> tuple[float, float, float]:
    """(AP centre y, AP semi-axis ry, z centre) of a vertebral body, mm."""
    k = VERTEBRAE.index(name)
    z = p.zc(name)
    return float(p.profile(z, "spine_y")), 0.78 * (13.0 + 0.8 * k) * p.height_scale, z


def _front(p: Patient, name: str, gap_mm: float) -> float:
    """AP position ``gap_mm`` in front of the anterior surface of a vertebral body."""
    y, ry, _ = _vb(p, name)
    return y - ry - gap_mm


def _below_diaphragm(p: Patient, g: dict):
    return lambda X, Y, Z: cavity_mask(X, Y, Z, p) & (Z < diaphragm_z(X, Y, g) - 6.0)


def _above_diaphragm(p: Patient, g: dict):
    return lambda X, Y, Z: cavity_mask(X, Y, Z, p) & (Z > diaphragm_z(X, Y, g))


def _paint_ellipsoid(canvas: Canvas, c, r, hu, label=0, rot=None, clip=None, protect=()) -> None:
    shape = ellipsoid(c, r, rot)
    mask = shape if clip is None else (lambda X, Y, Z: shape(X, Y, Z) & clip(X, Y, Z))
    canvas.paint(*ellipsoid_bounds(c, r), mask, hu, label, protect)


def paint_thorax(canvas: Canvas, p: Patient, g: dict, t: dict, j: _Jitter) -> dict:
    """Heart, trachea + main bronchi, esophagus (5), thoracic and abdominal aorta (8). Returns landmarks."""
    ha7 = float(p.profile(p.zc("T7"), "half_depth_ant"))
    heart = np.array([22.0, -0.3 * ha7, p.zc("T7") - 10.0]) + j.shift()
    s = j.scale()
    rot = rotation_zyx(-30.0, 25.0, 0.0)
    above = _above_diaphragm(p, g)
    _paint_ellipsoid(canvas, heart, np.array([66.0, 51.0, 56.0]) * s, t["fat"], rot=rot, clip=above)
    _paint_ellipsoid(canvas, heart, np.array([60.0, 45.0, 50.0]) * s, t["myocardium"], rot=rot, clip=above)
    _paint_ellipsoid(canvas, heart, np.array([48.0, 34.0, 38.0]) * s, t["heart_blood"], rot=rot, clip=above)
    top = p.vertebra_z_mm["C7"][1] + 60.0
    carina = (0.0, _front(p, "T5", 32.0), p.zc("T5"))
    for r, hu in ((11.0, t["muscle"]), (8.0, t["gas"])):
        paint_tube(canvas, [(0.0, _front(p, "C7", 32.0), top), carina], r, hu)
        for sd in (-1.0, 1.0):
            paint_tube(canvas, [carina, (sd * 40.0, _front(p, "T6", 22.0), p.zc("T6") - 10.0)], r * 0.65, hu)
    eso = [(2.0, _front(p, "C7", 12.0), top), (5.0, _front(p, "T4", 12.0), p.zc("T4")),
           (6.0, _front(p, "T8", 18.0), p.zc("T8")), (20.0, _front(p, "T10", 25.0), p.zc("T10")),
           (48.0, -8.0, p.zc("T11"))]
    eso = np.array(eso) + np.r_[j.shift(3.0)[:2], 0.0]
    paint_tube(canvas, eso, 9.0 * j.scale(), t["esophagus"], LAB["esophagus"])
    if j.rng.uniform() < 0.5:
        paint_tube(canvas, eso[:-1], 3.0, t["gas"], LAB["esophagus"])
    aorta = [(heart[0] - 15.0, heart[1] + 10.0, p.zc("T6")), (0.0, _front(p, "T4", 35.0), p.zc("T4")),
             (8.0, _front(p, "T3", 8.0), p.zc("T3")), (24.0, _front(p, "T5", 2.0), p.zc("T5")),
             (25.0, _front(p, "T8", 2.0), p.zc("T8")), (18.0, _front(p, "T12", 10.0), p.zc("T12")),
             (12.0, _front(p, "L1", 12.0), p.zc("L1")), (8.0, _front(p, "L3", 11.0), p.zc("L3")),
             (5.0, _front(p, "L4", 11.0), p.zc("L4"))]
    aorta = np.array(aorta) + np.r_[j.shift(3.0)[:2], 0.0]
    sa = j.scale(0.06)
    paint_tube(canvas, aorta, np.array([15, 15, 14, 13, 12, 11, 10, 9, 9]) * sa, t["aorta"], LAB["aorta"])
    for sd in (-1.0, 1.0):
        iliac = [aorta[-1], (sd * 35.0, _front(p, "L5", 6.0), p.zc("L5") - 10.0),
                 (sd * 60.0, -10.0, g["femoral_head_z"] + 50.0), (sd * 75.0, -30.0, g["femoral_head_z"])]
        paint_tube(canvas, iliac, 6.5, t["aorta"])
    return {"carina": carina, "aortic_bifurcation": tuple(aorta[-1]), "heart_centre": tuple(heart)}


def paint_upper_abdomen(canvas: Canvas, p: Patient, g: dict, t: dict, j: _Jitter) -> None:
    """Liver (6), stomach (7) and duodenum, gallbladder (4)."""
    below = _below_diaphragm(p, g)
    hw = g["dome_half_width"]
    s = j.scale()
    right = np.array([-0.4 * hw, -5.0, g["dome_r_z"] - 70.0]) + j.shift()
    left = np.array([20.0, -45.0, g["dome_r_z"] - 45.0]) + j.shift()
    r_right, r_left = np.array([0.55 * hw, 85.0, 85.0]) * s, np.array([75.0, 40.0, 45.0]) * s * j.scale()
    lobes = ellipsoid(right, r_right), ellipsoid(left, r_left)
    lo = np.minimum(right - r_right, left - r_left)
    hi = np.maximum(right + r_right, left + r_left)
    canvas.paint(lo, hi, lambda X, Y, Z: (lobes[0](X, Y, Z) | lobes[1](X, Y, Z)) & below(X, Y, Z),
                 t["liver"], LAB["liver"])
    zl1 = p.zc("L1")
    stomach = np.array([(0.3 * hw, -5.0, g["dome_l_z"] - 25.0), (60.0, -40.0, g["dome_l_z"] - 70.0),
                        (45.0, -60.0, zl1), (5.0, -65.0, zl1 + 5.0), (-25.0, -50.0, zl1 + 5.0)]) + j.shift()
    radii = np.array([40.0, 38.0, 32.0, 24.0, 13.0]) * j.scale(0.12)
    paint_tube(canvas, stomach, radii, t["gut_wall"], LAB["stomach"], clip=below)
    level = -70.0 + j.rng.uniform(0.0, 70.0)           # air-fluid level: air anterior (supine patient)
    paint_tube(canvas, stomach, radii - 4.0, lambda X, Y, Z: np.where(Y < level, t["gas"], t["stomach_fluid"]),
               LAB["stomach"], clip=below)
    duodenum = [stomach[-1], (-50.0, -35.0, zl1), (-55.0, -10.0, p.zc("L2")), (-50.0, -5.0, p.zc("L3")),
                (0.0, _front(p, "L3", 28.0), p.zc("L3")), (25.0, -10.0, p.zc("L2"))]
    paint_tube(canvas, duodenum, 12.0, t["bowel"], clip=below)
    gb = np.array([-0.3 * hw, -50.0, g["dome_r_z"] - 120.0]) + j.shift()
    _paint_ellipsoid(canvas, gb, np.array([16.0, 16.0, 40.0]) * j.scale(0.12), t["bile"], LAB["gallbladder"],
                     rot=rotation_zyx(0.0, 0.0, -35.0), clip=below)


def paint_spleen(canvas: Canvas, p: Patient, g: dict, t: dict, j: _Jitter) -> None:
    """Spleen (1), painted after stomach and kidneys: it indents the stomach, never the left kidney."""
    below = _below_diaphragm(p, g)
    # spleen: against the posterolateral wall of the left upper quadrant, thin axis along the wall's normal
    z_spleen = g["dome_l_z"] - 55.0
    fat = float(p.profile(z_spleen, "fat"))
    a_c = float(p.profile(z_spleen, "half_width")) - fat - 16.0
    b_c = float(p.profile(z_spleen, "half_depth_post")) - 0.5 * fat - 16.0
    theta = np.deg2rad(50.0 + j.rng.uniform(-10.0, 10.0))
    spleen = np.array([(a_c - 24.0) * np.sin(theta), (b_c - 24.0) * np.cos(theta), z_spleen]) + j.shift(4.0)
    yaw = np.rad2deg(np.arctan2(np.cos(theta) / b_c, np.sin(theta) / a_c))
    _paint_ellipsoid(canvas, spleen, np.array([22.0, 38.0, 60.0]) * j.scale(0.1), t["spleen"], LAB["spleen"],
                     rot=rotation_zyx(yaw, 0.0, -25.0), clip=below,
                     protect=(LAB["kidney_left"], LAB["adrenal_left"]))


def paint_retroperitoneum(canvas: Canvas, p: Patient, g: dict, t: dict, j: _Jitter) -> dict:
    """Kidneys (2, 3) in perirenal fat, adrenals (12, 13), pancreas (11), portal/splenic vein (10), IVC (9)."""
    below = _below_diaphragm(p, g)
    z_left = p.zc("L1") + j.rng.uniform(-10.0, 10.0)
    drop = j.rng.uniform(10.0, 20.0)                  # the right kidney sits 1-2 cm lower
    size = np.array([28.0, 18.0, 55.0]) * j.scale()
    out = {}
    for side, sd in (("right", -1.0), ("left", 1.0)):
        x = sd * (13.0 + 0.8 * VERTEBRAE.index("L1") + 48.0)
        c = np.array([x, p.profile(z_left, "spine_y") + 12.0, z_left - (drop if sd < 0 else 0.0)]) + j.shift(4.0)
        rot = rotation_zyx(sd * 30.0, -sd * 15.0, -20.0)
        _paint_ellipsoid(canvas, c, size + 10.0, t["fat"], rot=rot, clip=below)
        _paint_ellipsoid(canvas, c, size, t["kidney_cortex"], LAB[f"kidney_{side}"], rot=rot, clip=below)
        _paint_ellipsoid(canvas, c, size * 0.6, t["kidney_medulla"], LAB[f"kidney_{side}"], rot=rot, clip=below)
        upper = c + rot[:, 2] * size[2]
        apex = upper + np.array([-sd * 8.0, -5.0, 22.0])
        limbs = [apex + np.array([0.0, 12.0, -35.0]), apex + np.array([sd * 12.0, 2.0, -30.0])]
        for end in limbs:
            paint_tube(canvas, [apex, end], 4.0, t["adrenal"], LAB[f"adrenal_{side}"])
        out[f"kidney_{side}_centre"] = tuple(c)
        out[f"hilum_{side}"] = tuple(c - sd * np.array([size[0], 0.0, 0.0]))
    zl1, zt12 = p.zc("L1"), p.zc("T12")
    pancreas = np.array([(-38.0, -20.0, p.zc("L2") + 5.0), (-5.0, -35.0, zl1), (35.0, -22.0, zl1 + 10.0),
                         (75.0, 2.0, zt12)]) + j.shift()
    paint_tube(canvas, pancreas, np.array([16.0, 11.0, 11.0, 9.0]) * j.scale(0.1), t["pancreas"],
               LAB["pancreas"], clip=below)
    conf = pancreas[1] + np.array([0.0, 16.0, 5.0])
    hilum = np.array([-0.3 * g["dome_half_width"], -20.0, zt12 + 30.0]) + j.shift(4.0)
    portal = [conf, (conf + hilum) / 2 + np.array([0.0, -5.0, 0.0]), hilum]
    paint_tube(canvas, portal, 7.0, t["portal"], LAB["portal_splenic_vein"], clip=below)
    paint_tube(canvas, [hilum, hilum + (-30.0, 10.0, 15.0)], 5.0, t["portal"], LAB["portal_splenic_vein"], clip=below)
    splenic = [conf, pancreas[2] + np.array([0.0, 13.0, 0.0]), pancreas[3] + np.array([0.0, 11.0, 5.0])]
    paint_tube(canvas, splenic, 4.5, t["portal"], LAB["portal_splenic_vein"], clip=below)
    ivc = [(-15.0, _front(p, "L5", 10.0), p.zc("L5")), (-22.0, _front(p, "L3", 12.0), p.zc("L3")),
           (-25.0, _front(p, "L1", 15.0), zl1), (-28.0, _front(p, "T12", 20.0), p.zc("T11")),
           (-18.0, -10.0, g["dome_r_z"] + 10.0)]
    ivc = np.array(ivc) + np.r_[j.shift(3.0)[:2], 0.0]
    paint_tube(canvas, ivc, 11.0 * j.scale(0.06), t["ivc"], LAB["inferior_vena_cava"])
    for side, sd in (("right", -1.0), ("left", 1.0)):
        paint_tube(canvas, [out[f"hilum_{side}"], ivc[2] + (0.0, 0.0, -5.0)], 4.5, t["ivc"], clip=below)
        paint_tube(canvas, [ivc[0], (sd * 38.0, _front(p, "L5", 0.0), p.zc("L5") - 20.0),
                            (sd * 70.0, -20.0, g["femoral_head_z"] + 20.0)], 7.0, t["ivc"])
    return out


def paint_pelvic_organs(canvas: Canvas, p: Patient, g: dict, t: dict, j: _Jitter, y_symph: float) -> None:
    """Urinary bladder behind the pubic symphysis (unlabelled)."""
    fill = j.scale(0.2)
    c = np.array([0.0, y_symph + 40.0 * fill, 35.0 * fill]) + j.shift(4.0)
    _paint_ellipsoid(canvas, c, np.array([45.0, 35.0, 35.0]) * fill, t["urine"],
                     clip=lambda X, Y, Z: cavity_mask(X, Y, Z, p))
