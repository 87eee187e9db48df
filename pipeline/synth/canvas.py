"""The volume being painted and the shape primitives the anatomy is drawn with.

A :class:`Canvas` holds a float32 HU volume and a uint8 label volume on the scanner grid (z, y, x) and maps any
sub-box of voxels to body-frame coordinates (mm, see :mod:`pipeline.synth.anatomy`). Structures are painted
one after another, each only inside its own bounding sub-box; a later structure overwrites an earlier one
(HU and label, label 0 for unlabelled tissue).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.synth.anatomy import warp_displacement

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]     # body-frame X, Y, Z (mm), float32, sub-box shaped
HU = float | Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Canvas:
    """HU (float32) and label (uint8) volumes of shape ``shape_zyx`` plus the voxel -> body-frame map."""

    def __init__(self, shape_zyx: tuple[int, int, int], spacing_zyx_mm: tuple[float, float, float],
                 origin_xyz_mm: tuple[float, float, float], frame: dict):
        self.shape_zyx = tuple(int(s) for s in shape_zyx)
        self.hu = np.full(self.shape_zyx, -1000.0, np.float32)
        self.label = np.zeros(self.shape_zyx, np.uint8)
        self.warp = frame["warp"]
        offset = frame["offset_xyz_mm"]
        # pre-warp body coordinates along each array axis, (z, y, x) order
        self.q_zyx = [origin_xyz_mm[2 - a] + spacing_zyx_mm[a] * np.arange(self.shape_zyx[a]) - offset[2 - a]
                      for a in range(3)]
        self.spacing_zyx_mm = tuple(float(s) for s in spacing_zyx_mm)
        w = self.warp
        axis_max = [sum(max(abs(v) for v in w[k]) for k in keys)
                    for keys in (("dx_of_z", "dx_of_y"), ("dy_of_z", "dy_of_x"), ("dz_of_x", "dz_of_y"))]
        self.margin_mm = max(axis_max) + 1.0   # a body-frame box grows by this much in voxel space

    def box(self, lo_xyz_mm, hi_xyz_mm) -> tuple[slice, slice, slice] | None:
        """Voxel sub-box (z, y, x slices) covering the body-frame box [lo, hi] (mm); None if outside."""
        out = []
        for a in range(3):
            q, lo, hi = self.q_zyx[a], lo_xyz_mm[2 - a] - self.margin_mm, hi_xyz_mm[2 - a] + self.margin_mm
            start, stop = np.searchsorted(q, lo), np.searchsorted(q, hi, side="right")
            if stop <= start:
                return None
            out.append(slice(int(start), int(stop)))
        return tuple(out)

    def coords(self, box: tuple[slice, slice, slice]) -> Coords:
        """Body-frame X, Y, Z (mm, float32) of every voxel of ``box``, each shaped like the sub-box."""
        qz, qy, qx = (self.q_zyx[a][box[a]].astype(np.float32) for a in range(3))
        qz3, qy3, qx3 = qz[:, None, None], qy[None, :, None], qx[None, None, :]
        dx, dy, dz = warp_displacement(qx3, qy3, qz3, self.warp)
        shape = (len(qz), len(qy), len(qx))
        return (np.broadcast_to(qx3 + dx, shape), np.broadcast_to(qy3 + dy, shape),
                np.broadcast_to(qz3 + dz, shape))

    def paint(self, lo_xyz_mm, hi_xyz_mm, mask_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
              hu: HU, label: int = 0, protect: tuple[int, ...] = ()) -> None:
        """Set HU (a number or a function of X, Y, Z) and ``label`` where ``mask_fn(X, Y, Z)`` holds,
        except on voxels already labelled with one of ``protect``."""
        box = self.box(lo_xyz_mm, hi_xyz_mm)
        if box is None:
            return
        xyz = self.coords(box)
        mask = mask_fn(*xyz)
        if protect:
            mask &= ~np.isin(self.label[box], protect)
        if not mask.any():
            return
        self.hu[box][mask] = hu(*xyz)[mask] if callable(hu) else hu
        self.label[box][mask] = label


# ------------------------------------------------------------------------------------------ primitives
def ellipsoid(center, radii, rotation: np.ndarray | None = None):
    """Mask function of an ellipsoid (centre, semi-axes in mm, optional 3x3 rotation body <- local)."""
    c = np.asarray(center, np.float32)
    inv_r2 = 1.0 / np.square(np.asarray(radii, np.float32))

    def mask(X, Y, Z):
        d = (X - c[0], Y - c[1], Z - c[2])
        if rotation is not None:   # local = R^T (p - c)
            d = tuple(rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2] for k in range(3))
        return d[0] * d[0] * inv_r2[0] + d[1] * d[1] * inv_r2[1] + d[2] * d[2] * inv_r2[2] <= 1.0
    return mask


def ellipsoid_bounds(center, radii) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds (lo, hi) covering an ellipsoid under any rotation."""
    r = float(np.max(radii))
    c = np.asarray(center, np.float64)
    return c - r, c + r


def rotation_zyx(yaw_deg: float, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation: yaw about z, then pitch about y, then roll about x (degrees)."""
    a, b, g = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(g), -np.sin(g)], [0, np.sin(g), np.cos(g)]])
    return (rz @ ry @ rx).astype(np.float32)


def capsule(a, b, radius_a: float, radius_b: float):
    """Mask function of a segment a -> b (mm) swept by a radius varying linearly from radius_a to radius_b."""
    a = np.asarray(a, np.float32)
    d = np.asarray(b, np.float32) - a
    dd = max(float(d @ d), 1e-6)

    def mask(X, Y, Z):
        px, py, pz = X - a[0], Y - a[1], Z - a[2]
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
        ex, ey, ez = px - t * d[0], py - t * d[1], pz - t * d[2]
        r = radius_a + t * (radius_b - radius_a)
        return ex * ex + ey * ey + ez * ez <= r * r
    return mask


def paint_tube(canvas: Canvas, points_mm, radii_mm, hu: HU, label: int = 0, clip=None) -> None:
    """Paint a tube along a polyline (K, 3) mm with per-vertex radii (K,) mm, segment by segment.

    ``clip`` (optional mask function of X, Y, Z) restricts the tube, e.g. to below the diaphragm.
    """
    pts = np.asarray(points_mm, np.float64)
    radii = np.broadcast_to(np.asarray(radii_mm, np.float64), (len(pts),))
    for k in range(len(pts) - 1):
        if radii[k] <= 0 and radii[k + 1] <= 0:
            continue
        r = max(radii[k], radii[k + 1])
        lo = np.minimum(pts[k], pts[k + 1]) - r
        hi = np.maximum(pts[k], pts[k + 1]) + r
        tube = capsule(pts[k], pts[k + 1], radii[k], radii[k + 1])
        mask = tube if clip is None else (lambda X, Y, Z, tube=tube: tube(X, Y, Z) & clip(X, Y, Z))
        canvas.paint(lo, hi, mask, hu, label)


def _linear_upsampler(m: int, n: int) -> np.ndarray:
    """(n, m) float32 matrix interpolating m knots linearly onto n points spanning the same extent."""
    pos = np.linspace(0.0, m - 1.0, n)
    lo = np.minimum(np.floor(pos).astype(int), m - 2)
    frac = pos - lo
    mat = np.zeros((n, m), np.float32)
    mat[np.arange(n), lo] = 1.0 - frac
    mat[np.arange(n), lo + 1] = frac
    return mat


def smooth_noise(rng: np.random.Generator, shape_zyx, spacing_zyx_mm, cell_mm: float) -> np.ndarray:
    """Smooth random field (float32, unit SD) of ``shape_zyx``: white noise on a ``cell_mm`` grid, linearly
    upsampled axis by axis (matrix products: fast on whole volumes)."""
    low = tuple(max(2, int(np.ceil(n * s / cell_mm)) + 1) for n, s in zip(shape_zyx, spacing_zyx_mm))
    field = rng.standard_normal(low, dtype=np.float32)
    mz, my, mx = (_linear_upsampler(m, n) for m, n in zip(low, shape_zyx))
    field = np.tensordot(mz, field, axes=(1, 0))                  # (nz, my, mx)
    field = np.matmul(my[None], field)                             # (nz, ny, mx)
    field = np.ascontiguousarray(field @ mx.T, dtype=np.float32)   # (nz, ny, nx)
    return field / np.float32(max(float(field[::3, ::3, ::3].std()), 1e-6))
