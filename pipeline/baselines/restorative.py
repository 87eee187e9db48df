"""Models Genesis corruptions (Zhou et al. 2019/2021) for the restorative baseline: the network learns to
reconstruct the original [0, 1] patch from a corrupted one.

Transforms and default rates follow the reference implementation (MrGiovanni/ModelsGenesis, ``utils.py``):
local pixel shuffling (0.5), a non-linear Bezier intensity curve (0.9), then painting (0.9): in-painting
(0.2) or out-painting (0.8). Every function takes a patch ``x01`` (..., D, H, W) float in [0, 1] and a
``numpy.random.Generator``; leading axes (channels) share one corruption. Outputs keep shape and dtype and
stay in [0, 1]. Block sizes are fractions of the patch size, so any patch size works.
"""

from __future__ import annotations

from math import comb

import numpy as np

#: Voxels of the 64 x 64 x 32 patch for which Models Genesis shuffles 10,000 blocks.
_GENESIS_PATCH_VOXELS = 64 * 64 * 32


def _check_patch(x01: np.ndarray) -> None:
    if x01.ndim < 3 or min(x01.shape[-3:]) < 2:
        raise ValueError(f"x01 must be (..., D, H, W) with D, H, W >= 2, got shape {x01.shape}")
    if x01.size and (x01.min() < 0 or x01.max() > 1):
        raise ValueError(f"x01 must be scaled to [0, 1], got values in [{x01.min()}, {x01.max()}]")


def bezier_curve(points: np.ndarray, n_times: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Cubic (degree len(points) - 1) Bezier curve through control ``points`` (N, 2), sampled at
    ``n_times`` parameters from the first to the last point. Returns (xs, ys), each (n_times,) float64."""
    n = len(points) - 1
    t = np.linspace(0.0, 1.0, n_times)
    basis = np.stack([comb(n, i) * t ** i * (1 - t) ** (n - i) for i in range(n + 1)])  # (N, n_times)
    return basis.T @ points[:, 0], basis.T @ points[:, 1]


def nonlinear_intensity(x01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map intensities through a random monotone Bezier curve from (0, 0) to (1, 1); half of the time the
    curve is reversed (an intensity inversion, as in Models Genesis)."""
    _check_patch(x01)
    points = np.array([[0.0, 0.0], rng.random(2), rng.random(2), [1.0, 1.0]])
    xs, ys = bezier_curve(points)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    if rng.random() < 0.5:
        ys = ys[::-1]
    return np.interp(x01, xs, ys).astype(x01.dtype)


def _random_box(rng: np.random.Generator, shape_zyx, low_frac: float, high_frac: float,
                min_high: int = 1) -> tuple[slice, ...]:
    """A box whose size along each axis is drawn from [low_frac, high_frac] of that axis (at least 1 voxel,
    up to at least ``min_high`` voxels), placed uniformly inside the patch."""
    box = []
    for n in shape_zyx:
        lo = max(int(n * low_frac), 1)
        hi = min(max(int(n * high_frac), lo, min_high), n)
        size = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, n - size + 1))
        box.append(slice(start, start + size))
    return (Ellipsis, *box)


def local_pixel_shuffling(x01: np.ndarray, rng: np.random.Generator, n_blocks: int | None = None) -> np.ndarray:
    """Shuffle voxels inside many small random blocks (sides 1 to max(2, 1/10 of the patch)); blocks are shuffled
    one after the other in place, so the patch's multiset of values is kept. ``n_blocks`` default: 10,000 per 64x64x32
    voxels (Models Genesis), scaled to the patch volume."""
    _check_patch(x01)
    shape = x01.shape[-3:]
    if n_blocks is None:
        n_blocks = max(1, round(10_000 * int(np.prod(shape)) / _GENESIS_PATCH_VOXELS))
    out = x01.copy()
    lead = x01.shape[:-3]
    for _ in range(n_blocks):
        box = _random_box(rng, shape, 0.0, 0.1, min_high=2)
        block = out[box]
        flat = block.reshape(*lead, -1)
        out[box] = flat[..., rng.permutation(flat.shape[-1])].reshape(block.shape)
    return out


def in_painting(x01: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Replace 1 to ``max_boxes`` boxes (sides 1/6 to 1/3 of the patch) with uniform noise; each further
    box is added with probability 0.95."""
    _check_patch(x01)
    out = x01.copy()
    for i in range(max_boxes):
        if i and rng.random() >= 0.95:
            break
        box = _random_box(rng, x01.shape[-3:], 1 / 6, 1 / 3)
        out[box] = rng.random(out[box].shape)
    return out


def out_painting(x01: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Uniform noise everywhere except 1 to ``max_boxes`` boxes (sides 3/7 to 4/7 of the patch) that keep
    the original; each further box is added with probability 0.95."""
    _check_patch(x01)
    out = rng.random(x01.shape).astype(x01.dtype)
    for i in range(max_boxes):
        if i and rng.random() >= 0.95:
            break
        box = _random_box(rng, x01.shape[-3:], 3 / 7, 4 / 7)
        out[box] = x01[box]
    return out


def genesis_corrupt(x01: np.ndarray, rng: np.random.Generator, local_rate: float = 0.5,
                    nonlinear_rate: float = 0.9, paint_rate: float = 0.9, inpaint_rate: float = 0.2) -> np.ndarray:
    """The Models Genesis corruption of one patch (..., D, H, W) in [0, 1]: shuffle (``local_rate``), Bezier
    intensity (``nonlinear_rate``), then in-painting (``paint_rate * inpaint_rate``) or out-painting
    (``paint_rate * (1 - inpaint_rate)``). When no transform is drawn (0.5 % with the defaults), local
    shuffling is applied so that the target always differs from the input."""
    applied = False
    out = np.array(x01, copy=True)
    _check_patch(out)
    if rng.random() < local_rate:
        out, applied = local_pixel_shuffling(out, rng), True
    if rng.random() < nonlinear_rate:
        out, applied = nonlinear_intensity(out, rng), True
    if rng.random() < paint_rate:
        paint = in_painting if rng.random() < inpaint_rate else out_painting
        out, applied = paint(out, rng), True
    return out if applied else local_pixel_shuffling(out, rng)


def genesis_corrupt_batch(x01_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``genesis_corrupt`` applied to each patch of a (B, C, D, H, W) batch independently."""
    return np.stack([genesis_corrupt(x, rng) for x in x01_b])
