"""Skeleton of the phantom: vertebrae (cortex, cancellous core, discs, arches, processes), ribs, sternum,
clavicles, sacrum, iliac wings, acetabula, femora and pubic rami. Body-frame mm throughout."""

from __future__ import annotations

import numpy as np

from pipeline.synth.anatomy import VERTEBRAE, Patient
from pipeline.synth.body import SKIN_MM, fat_thickness, trunk_depth
from pipeline.synth.canvas import Canvas, ellipsoid, paint_tube


def _cylinder(cx, cy, rx, ry, z0, z1):
    """Mask of an elliptic cylinder along z (centre cx, cy; semi-axes rx, ry; z0 <= Z <= z1), mm."""
    def mask(X, Y, Z):
        return (((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0) & (Z >= z0) & (Z <= z1)
    return mask


def vertebra_centre(p: Patient, name: str) -> tuple[float, float, float]:
    """Body-frame centre (mm) of a vertebral body."""
    z = p.zc(name)
    return (0.0, float(p.profile(z, "spine_y")), z)


def paint_spine(canvas: Canvas, p: Patient, tissue: dict) -> None:
    """Vertebral bodies (cortex shell, cancellous core), discs, spinal canal, arches, spinous/transverse processes."""
    cortex, spongy = tissue["bone_cortex"], tissue["bone_cancellous"]
    for k, name in enumerate(VERTEBRAE):
        zb, zt = p.vertebra_z_mm[name]
        _, y, zc = vertebra_centre(p, name)
        rx = (13.0 + 0.8 * k) * p.height_scale
        ry = 0.78 * rx
        below = p.vertebra_z_mm[VERTEBRAE[k + 1]][1] if k + 1 < len(VERTEBRAE) else zb
        lo, hi = (-rx - 40, y - ry - 5, below - 5), (rx + 40, y + ry + 60, zt + 5)
        canvas.paint(lo, hi, _cylinder(0, y, rx, ry, below, zb), tissue["disc"])
        canvas.paint(lo, hi, _cylinder(0, y, rx, ry, zb, zt), cortex)
        canvas.paint(lo, hi, _cylinder(0, y, rx - 3, ry - 3, zb + 2, zt - 2), spongy)
        if name == "S1":
            continue
        yc = y + ry + 9.0
        thoracic = name.startswith("T")
        arch = _cylinder(0, yc, 15.0, 15.0, zb, zt)
        canvas.paint(lo, hi, lambda X, Y, Z, arch=arch, yc=yc: arch(X, Y, Z) & (Y > yc - 3.0), cortex * 0.7)
        canvas.paint(lo, hi, _cylinder(0, yc, 8.5, 8.5, below, zt), tissue["csf"])
        length, drop = (38.0, 22.0) if thoracic else (30.0, 6.0)
        paint_tube(canvas, [(0, yc + 13, zc), (0, yc + 13 + length, zc - drop)], [5.0, 4.0], cortex * 0.7)
        for s in (-1.0, 1.0):
            tip = (s * (rx + (24.0 if thoracic else 28.0)), yc + (8.0 if thoracic else -4.0), zc + 3)
            paint_tube(canvas, [(s * 9.0, yc - 2, zc + 3), tip], [5.0, 4.0], cortex * 0.7)


def _rib_path(p: Patient, k: int, side: float, n: int = 10) -> tuple[np.ndarray, int]:
    """Polyline (n + 1, 3) mm of rib k (1..12) on one side, and the index where costal cartilage starts."""
    end = {11: 0.55, 12: 0.42}.get(k, 0.88 if k <= 7 else 0.78) * np.pi
    drop = {1: 35.0, 2: 60.0, 11: 60.0, 12: 45.0}.get(k, 95.0) * p.height_scale
    _, y_head, z_head = vertebra_centre(p, f"T{k}")
    theta = np.linspace(0.1 * np.pi, end, n)
    z = z_head + 5.0 - drop * (theta / np.pi) ** 1.3
    v = np.cos(theta)
    a = p.profile(z, "half_width")
    b = np.where(v > 0, p.profile(z, "half_depth_post"), p.profile(z, "half_depth_ant"))
    depth = SKIN_MM + fat_thickness(z, v, p) + 7.0
    pts = np.stack([side * (a - depth) * np.sin(theta), (b - depth) * v, z], axis=1)
    head = np.array([[side * (14.0 + 0.8 * k), y_head + 8.0, z_head + 5.0]])
    cartilage = n + 1 - (3 if k <= 10 else n + 1)
    return np.concatenate([head, pts]), cartilage


def paint_ribs(canvas: Canvas, p: Patient, tissue: dict) -> None:
    """12 pairs of ribs sloping down anteriorly, costal cartilage at the front ends of ribs 1-10."""
    rib_hu = 0.6 * tissue["bone_cortex"] + 0.4 * tissue["bone_cancellous"]
    for k in range(1, 13):
        for side in (-1.0, 1.0):
            pts, cart = _rib_path(p, k, side)
            paint_tube(canvas, pts[:cart + 1], 4.5, rib_hu)
            if cart < len(pts) - 1:
                paint_tube(canvas, pts[cart:], 4.5, tissue["cartilage"])


def paint_sternum_clavicles(canvas: Canvas, p: Patient, tissue: dict) -> None:
    """Sternum in the anterior chest wall (T2-T9) and the clavicles from the manubrium to the shoulders."""
    z0, z1 = p.zc("T9") - 10.0, p.vertebra_z_mm["T2"][1] + 10.0
    ha = float(p.half_depth_ant_mm.max())

    def sternum(X, Y, Z):
        depth, v = trunk_depth(X, Y, Z, p)
        start = SKIN_MM + fat_thickness(Z, v, p) + 1.0
        half = np.where(Z > z1 - 40.0, 24.0, 14.0)
        return (np.abs(X) < half) & (Y < 0) & (depth >= start) & (depth < start + 12.0) & (Z >= z0) & (Z <= z1)

    canvas.paint((-30, -ha - 20, z0), (30, 0, z1), sternum, 0.5 * tissue["bone_cortex"])
    y_ant = -float(p.profile(z1, "half_depth_ant")) + SKIN_MM + float(p.profile(z1, "fat")) + 10.0
    hw = float(p.profile(p.zc("C7"), "half_width"))
    for s in (-1.0, 1.0):
        path = [(s * 22.0, y_ant, z1), (s * 0.45 * hw, y_ant - 4.0, z1 + 12.0), (s * 0.85 * hw, y_ant + 35.0,
                                                                                   p.zc("C7") + 10.0)]
        paint_tube(canvas, path, 7.0, 0.6 * tissue["bone_cortex"])


def pelvis_points(p: Patient, g: dict) -> dict[str, tuple[float, float, float]]:
    """Body-frame landmarks (mm) of the pelvis: femoral head centres, pubic symphysis, iliac crests."""
    hw0 = float(p.profile(0.0, "half_width"))
    y_symph = -float(p.profile(0.0, "half_depth_ant")) + SKIN_MM + float(p.profile(0.0, "fat")) + 15.0
    hw_crest = float(p.profile(g["crest_z"], "half_width"))
    out = {"pubic_symphysis": (0.0, y_symph, 0.0)}
    for side, s in (("right", -1.0), ("left", 1.0)):
        out[f"femoral_head_{side}"] = (s * 0.55 * hw0, -5.0, g["femoral_head_z"])
        out[f"iliac_crest_{side}"] = (s * 0.7 * hw_crest, 10.0, g["crest_z"])
    return out


def _iliac_wing(s: float, p: Patient, g: dict, y_si: float, width_mm: float):
    z_ac, z_crest = g["femoral_head_z"] + 25.0, g["crest_z"]
    hw, ha = float(p.profile(z_crest, "half_width")), float(p.profile(z_crest, "half_depth_ant"))

    def mask(X, Y, Z):
        u = np.clip((Z - z_ac) / (z_crest - z_ac), 0, 1)
        ax, ay = s * 45.0, y_si + 15.0
        bx, by = s * (70.0 + u * (0.8 * hw - 70.0)), -5.0 - u * (0.3 * ha - 5.0)
        dx, dy = bx - ax, by - ay
        t = np.clip(((X - ax) * dx + (Y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
        dist2 = (X - ax - t * dx) ** 2 + (Y - ay - t * dy) ** 2
        return (dist2 <= width_mm ** 2) & (Z >= z_ac - 5.0) & (Z <= z_crest - 12.0 * (2 * t - 1) ** 2)
    return mask


def paint_pelvis(canvas: Canvas, p: Patient, g: dict, tissue: dict) -> None:
    """Sacrum (S2-S5, alae), iliac wings, acetabula, femoral heads/necks/shafts, pubic and ischial rami."""
    cortex, spongy = tissue["bone_cortex"], tissue["bone_cancellous"]
    _, y_s1, z_s1 = vertebra_centre(p, "S1")
    for k, (rx, ry) in enumerate([(40, 16), (32, 14), (22, 12), (12, 9)], start=1):
        c = (0.0, y_s1 + 12.0 * k, z_s1 - 26.0 * k)
        canvas.paint(np.subtract(c, 45), np.add(c, 45), ellipsoid(c, (rx, ry, 15.0)), spongy + 60.0)
    pts = pelvis_points(p, g)
    hw0 = float(p.profile(0.0, "half_width"))
    for side, s in (("right", -1.0), ("left", 1.0)):
        ala = (s * 35.0, y_s1 + 5.0, z_s1)
        canvas.paint(np.subtract(ala, 35), np.add(ala, 35), ellipsoid(ala, (30.0, 16.0, 18.0)), spongy + 60.0)
        lo, hi = (min(s * 45, s * 140) - 10, -60.0, g["femoral_head_z"]), (max(s * 45, s * 140) + 10, 90.0,
                                                                            g["crest_z"] + 10)
        canvas.paint(lo, hi, _iliac_wing(s, p, g, y_s1, 6.0), cortex * 0.8)
        canvas.paint(lo, hi, _iliac_wing(s, p, g, y_s1, 3.0), spongy)
        head = np.array(pts[f"femoral_head_{side}"])
        canvas.paint(head - 35, head + 35,
                     lambda X, Y, Z, h=head, s=s: ellipsoid(h, (33.0,) * 3)(X, Y, Z)
                     & ~ellipsoid(h, (26.0,) * 3)(X, Y, Z) & (Z > h[2] - 8.0) & (s * (X - h[0]) < 12.0), cortex * 0.8)
        trochanter = (s * (hw0 - 35.0), 5.0, head[2] - 15.0)
        shaft_end = (s * (hw0 - 50.0), 0.0, head[2] - 250.0)
        for radius, hu in ((1.0, cortex), (0.75, spongy)):
            canvas.paint(head - 30, head + 30, ellipsoid(head, (24.0 * radius,) * 3), hu)
            paint_tube(canvas, [head, trochanter, shaft_end], [15.0 * radius, 16.0 * radius, 13.0 * radius], hu)
        paint_tube(canvas, [(s * 70.0, -25.0, head[2]), (s * 8.0, pts["pubic_symphysis"][1], -8.0)], 9.0,
                   cortex * 0.7)
        paint_tube(canvas, [(s * 80.0, 5.0, head[2] - 10.0), (s * 55.0, 20.0, head[2] - 60.0)], 12.0, cortex * 0.7)
