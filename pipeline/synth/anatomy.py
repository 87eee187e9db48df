"""Patient anatomy of the phantom: vertebral levels, trunk profile, placement, warp and anatomical coordinates.

Body frame: millimetres on LPS axes (x to the patient's left, y posterior, z superior) with its origin on the
body centre line at the top of the pubic symphysis. A world (scanner LPS) point ``p`` maps to the body frame
by ``q = p - offset_xyz_mm`` followed by a smooth warp ``body = q + d(q)`` whose three components are sums of
piecewise-linear 1-D functions (``d_x = f(q_z) + g(q_y)``, ``d_y = f(q_z) + g(q_x)``, ``d_z = f(q_x) + g(q_y)``):
lateral and sagittal bending of the whole trunk and a tilt of the diaphragm, cheap to evaluate on a grid.

Everything a scorer needs to recompute the ground truth lives in ``Patient.frame()`` (a JSON-able dict):
:func:`anatomical_coordinates` and :func:`body_to_world` take that dict, so they work from ``meta/<case>.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Vertebrae modelled, superior to inferior; the continuous level coordinate is the index in this tuple.
VERTEBRAE: tuple[str, ...] = (("C7",) + tuple(f"T{i}" for i in range(1, 13))
                              + tuple(f"L{i}" for i in range(1, 6)) + ("S1",))

#: (body height, disc below) in mm for a reference adult, superior to inferior.
_BODY_DISC_MM: dict[str, tuple[float, float]] = {
    "C7": (15.0, 4.0),
    **{f"T{i}": (17.0 + 7.0 * (i - 1) / 11, 4.0 + 3.0 * (i - 1) / 11) for i in range(1, 13)},
    "L1": (27.0, 8.0), "L2": (28.5, 9.0), "L3": (29.5, 10.0), "L4": (30.0, 10.0), "L5": (29.0, 11.0),
    "S1": (30.0, 0.0),
}

#: Trunk profile knots: (anchor, half width, anterior half depth, posterior half depth, fat, spine y), mm.
#: Anchors are vertebra centres, "symph" (z = 0) and offsets from them; values for habitus 1.
_PROFILE = (
    ("thigh", 162.0, 95.0, 105.0, 22.0, 70.0),
    ("symph", 170.0, 100.0, 110.0, 25.0, 60.0),
    ("L4", 160.0, 105.0, 105.0, 30.0, 25.0),
    ("L2", 150.0, 110.0, 100.0, 30.0, 20.0),
    ("T12", 155.0, 105.0, 105.0, 24.0, 35.0),
    ("T9", 160.0, 105.0, 110.0, 18.0, 50.0),
    ("T6", 165.0, 110.0, 115.0, 15.0, 55.0),
    ("T2", 150.0, 90.0, 105.0, 12.0, 45.0),
    ("C7", 120.0, 65.0, 85.0, 10.0, 35.0),
    ("neck", 60.0, 55.0, 55.0, 8.0, 15.0),
    ("head", 60.0, 55.0, 55.0, 8.0, 15.0),
)


_LUT_STEP_MM = 0.25


@dataclass
class Patient:
    """One sampled patient in the body frame (mm). Arrays are knot values along z (``profile_z_mm``)."""

    height_scale: float
    habitus: float
    vertebra_z_mm: dict[str, tuple[float, float]]   # name -> (bottom, top)
    profile_z_mm: np.ndarray                        # (K,) float64, increasing
    half_width_mm: np.ndarray                       # (K,)
    half_depth_ant_mm: np.ndarray                   # (K,)
    half_depth_post_mm: np.ndarray                  # (K,)
    fat_mm: np.ndarray                              # (K,) subcutaneous fat thickness
    spine_y_mm: np.ndarray                          # (K,) AP position of the vertebral body centres
    offset_xyz_mm: np.ndarray                       # (3,) world position of the body-frame origin
    warp: dict[str, list[float]] = field(default_factory=dict)
    _lut: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def zc(self, name: str) -> float:
        """z (mm) of a vertebral body centre."""
        bottom, top = self.vertebra_z_mm[name]
        return 0.5 * (bottom + top)

    def profile(self, z_mm: np.ndarray | float, which: str) -> np.ndarray:
        """Trunk profile ``which`` (half_width, half_depth_ant, half_depth_post, fat, spine_y) at z (mm).

        float32, shaped like ``z_mm``; linear between knots (a 0.25 mm lookup table: fast on whole volumes).
        """
        if not self._lut:
            z = np.arange(self.profile_z_mm[0], self.profile_z_mm[-1] + _LUT_STEP_MM, _LUT_STEP_MM)
            for name in ("half_width", "half_depth_ant", "half_depth_post", "fat", "spine_y"):
                self._lut[name] = np.interp(z, self.profile_z_mm, getattr(self, f"{name}_mm")).astype(np.float32)
        lut = self._lut[which]
        idx = (np.asarray(z_mm, np.float32) - np.float32(self.profile_z_mm[0])) * np.float32(1.0 / _LUT_STEP_MM)
        idx = np.clip(idx + np.float32(0.5), 0, len(lut) - 1).astype(np.intp)
        return lut[idx]

    def frame(self) -> dict:
        """JSON-able ground-truth frame for :func:`anatomical_coordinates` and :func:`body_to_world`."""
        return {
            "offset_xyz_mm": [float(v) for v in self.offset_xyz_mm],
            "warp": {k: [float(x) for x in v] for k, v in self.warp.items()},
            "profile_z_mm": self.profile_z_mm.tolist(),
            "half_width_mm": self.half_width_mm.tolist(),
            "half_depth_ant_mm": self.half_depth_ant_mm.tolist(),
            "half_depth_post_mm": self.half_depth_post_mm.tolist(),
            "vertebra_z_mm": {k: [float(v[0]), float(v[1])] for k, v in self.vertebra_z_mm.items()},
        }


def sample_vertebrae(rng: np.random.Generator, height_scale: float) -> dict[str, tuple[float, float]]:
    """Vertebral bodies stacked up from S1: name -> (bottom z, top z) in mm of the body frame."""
    out: dict[str, tuple[float, float]] = {}
    top = 95.0 * height_scale + rng.normal(0.0, 5.0)
    out["S1"] = (top - 30.0 * height_scale, top)
    for name in reversed(VERTEBRAE[:-1]):
        body, disc = _BODY_DISC_MM[name]
        bottom = top + disc * height_scale * rng.uniform(0.85, 1.15)
        top = bottom + body * height_scale * rng.uniform(0.93, 1.07)
        out[name] = (bottom, top)
    return {name: out[name] for name in VERTEBRAE}


def _anchor_z(anchor: str, vertebrae: dict[str, tuple[float, float]]) -> float:
    if anchor == "symph":
        return 0.0
    if anchor == "thigh":
        return -150.0
    if anchor == "neck":
        return vertebrae["C7"][1] + 60.0
    if anchor == "head":
        return vertebrae["C7"][1] + 300.0
    return 0.5 * sum(vertebrae[anchor])


def _smooth_walk(rng: np.random.Generator, n: int, sd_mm: float) -> list[float]:
    """n knot values of a centred, smooth random curve with standard deviation ~sd_mm."""
    walk = np.cumsum(rng.normal(0.0, 1.0, n))
    walk -= walk.mean()
    return list(walk * sd_mm / max(walk.std(), 1e-6))


def sample_warp(rng: np.random.Generator) -> dict[str, list[float]]:
    """Knots of the smooth warp (mm): bending along z (~8 mm) and tilts across x and y (~3 mm)."""
    z_knots = list(np.arange(-300.0, 901.0, 100.0))
    xy_knots = list(np.arange(-300.0, 301.0, 100.0))
    n_z, n_xy = len(z_knots), len(xy_knots)
    return {"z_knots": z_knots, "xy_knots": xy_knots,
            "dx_of_z": _smooth_walk(rng, n_z, 8.0), "dx_of_y": _smooth_walk(rng, n_xy, 2.0),
            "dy_of_z": _smooth_walk(rng, n_z, 8.0), "dy_of_x": _smooth_walk(rng, n_xy, 2.0),
            "dz_of_x": _smooth_walk(rng, n_xy, 3.0), "dz_of_y": _smooth_walk(rng, n_xy, 3.0)}


def sample_patient(rng: np.random.Generator) -> Patient:
    """Body size and shape (habitus), spine, trunk profile, placement on the table and warp."""
    height_scale = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    habitus = float(np.clip(rng.normal(1.0, 0.1), 0.78, 1.3))
    breadth = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    vertebrae = sample_vertebrae(rng, height_scale)
    table = np.array([row[1:] for row in _PROFILE])
    jitter = rng.normal(1.0, 0.03, table.shape)
    belly = np.array([habitus ** (1.6 if a in ("L4", "L2", "T12") else 1.0) for a, *_ in _PROFILE])
    z = np.array([_anchor_z(a, vertebrae) for a, *_ in _PROFILE])
    offset = np.array([rng.uniform(-30.0, 30.0), rng.uniform(-30.0, 40.0), rng.uniform(-1300.0, -500.0)])
    return Patient(
        height_scale=height_scale, habitus=habitus, vertebra_z_mm=vertebrae, profile_z_mm=z,
        half_width_mm=table[:, 0] * jitter[:, 0] * habitus ** 0.7 * breadth,
        half_depth_ant_mm=table[:, 1] * jitter[:, 1] * belly,
        half_depth_post_mm=table[:, 2] * jitter[:, 2] * habitus ** 0.4,
        fat_mm=np.clip(table[:, 3] * jitter[:, 3] * habitus ** 3.5, 4.0, 60.0),
        spine_y_mm=table[:, 4] * height_scale, offset_xyz_mm=offset, warp=sample_warp(rng))


def warp_displacement(q_x: np.ndarray, q_y: np.ndarray, q_z: np.ndarray,
                      warp: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp displacement (mm) at pre-warp body positions; inputs broadcast, float32 outputs (z, y, x parts)."""
    zk, xyk = warp["z_knots"], warp["xy_knots"]

    def f(q, knots, key):
        return np.interp(q, knots, warp[key]).astype(np.float32)

    dx = f(q_z, zk, "dx_of_z") + f(q_y, xyk, "dx_of_y")
    dy = f(q_z, zk, "dy_of_z") + f(q_x, xyk, "dy_of_x")
    dz = f(q_x, xyk, "dz_of_x") + f(q_y, xyk, "dz_of_y")
    return dx, dy, dz


def world_to_body(points_xyz_mm: np.ndarray, frame: dict) -> np.ndarray:
    """World LPS points (N, 3) mm -> body-frame points (N, 3) mm (float64)."""
    q = np.asarray(points_xyz_mm, np.float64) - np.asarray(frame["offset_xyz_mm"])
    dx, dy, dz = warp_displacement(q[:, 0], q[:, 1], q[:, 2], frame["warp"])
    return q + np.stack([dx, dy, dz], axis=1)


def body_to_world(points_body_mm: np.ndarray, frame: dict, iterations: int = 12) -> np.ndarray:
    """Body-frame points (N, 3) mm -> world LPS (N, 3) mm, inverting the warp by fixed-point iteration."""
    p = np.atleast_2d(np.asarray(points_body_mm, np.float64))
    q = p.copy()
    for _ in range(iterations):
        dx, dy, dz = warp_displacement(q[:, 0], q[:, 1], q[:, 2], frame["warp"])
        q = p - np.stack([dx, dy, dz], axis=1)
    return q + np.asarray(frame["offset_xyz_mm"])


def vertebral_level(z_mm: np.ndarray, vertebra_z_mm: dict) -> np.ndarray:
    """Continuous vertebral level at body-frame z (mm): 0 = C7 centre, 1 = T1, ..., 13 = L1, 18 = S1 centre.

    Grows inferiorly; linear between centres, extrapolated with the end slopes beyond C7 and S1.
    """
    centres = np.array([0.5 * sum(vertebra_z_mm[n]) for n in VERTEBRAE])[::-1]   # increasing z
    levels = np.arange(len(VERTEBRAE), dtype=np.float64)[::-1]
    z = np.asarray(z_mm, np.float64)
    out = np.interp(z, centres, levels)
    low_slope = (levels[1] - levels[0]) / (centres[1] - centres[0])
    high_slope = (levels[-1] - levels[-2]) / (centres[-1] - centres[-2])
    out = np.where(z < centres[0], levels[0] + (z - centres[0]) * low_slope, out)
    return np.where(z > centres[-1], levels[-1] + (z - centres[-1]) * high_slope, out)


def anatomical_coordinates(points_xyz_mm: np.ndarray, frame: dict) -> np.ndarray:
    """Ground-truth anatomical coordinates of world LPS points.

    Args:
        points_xyz_mm: (N, 3) world LPS positions in mm.
        frame: ``meta["frame"]`` of the case (``Patient.frame()``).
    Returns:
        (N, 3) float64 ``(lr, ap, si)``: ``lr`` = body x / trunk half width at that level (-1 right skin,
        +1 left skin), ``ap`` = body y / anterior or posterior half depth (-1 anterior skin, +1 posterior skin),
        ``si`` = continuous vertebral level (:func:`vertebral_level`, grows inferiorly).
    """
    body = world_to_body(np.atleast_2d(points_xyz_mm), frame)
    zk = frame["profile_z_mm"]
    half_width = np.interp(body[:, 2], zk, frame["half_width_mm"])
    ant = np.interp(body[:, 2], zk, frame["half_depth_ant_mm"])
    post = np.interp(body[:, 2], zk, frame["half_depth_post_mm"])
    lr = body[:, 0] / half_width
    ap = body[:, 1] / np.where(body[:, 1] > 0, post, ant)
    si = vertebral_level(body[:, 2], frame["vertebra_z_mm"])
    return np.stack([lr, ap, si], axis=1)
