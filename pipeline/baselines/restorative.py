"""Models Genesis corruptions (Zhou et al. 2019/2021) for the restorative baseline: the network learns to
reconstruct the original [0, 1] patch from a corrupted one.

Transforms and default rates follow the reference implementation (MrGiovanni/ModelsGenesis, ``utils.py``):
local pixel shuffling (0.5), a non-linear Bezier intensity curve (0.9), then painting (0.9): in-painting
(0.2) or out-painting (0.8). Every function takes a patch ``x01`` (..., D, H, W) float in [0, 1] and a
``numpy.random.Generator``; leading axes (channels) share one corruption. Outputs keep shape and dtype and
stay in [0, 1]. Block sizes are fractions of the patch size, so any patch size works.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _random_box(rng: np.random.Generator, shape_zyx, low_frac: float, high_frac: float) -> tuple[slice, ...]:
    """A box whose size along each axis is drawn from [low_frac, high_frac] of that axis (at least 1 voxel),
    placed uniformly inside the patch."""
    box = []
    for n in shape_zyx:
        lo = max(int(n * low_frac), 1)
        hi = min(max(int(n * high_frac), lo), n)
        size = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, n - size + 1))
        box.append(slice(start, start + size))
    return (Ellipsis, *box)


@dataclass(frozen=True)
class ShufflePlan:
    """The random draws of one local pixel shuffling, in the order Models Genesis applies its blocks.

    ``starts_zyx``, ``sizes_zyx``: (N, 3) int64 voxel corner and side lengths of block j. ``offsets``: (N + 1,)
    int64; block j owns entries ``offsets[j]:offsets[j + 1]`` (its voxels in C order) of ``perms`` (its uniform
    random permutation: new voxel k of the block = old voxel ``perms[k]``), ``dst`` and ``src`` (the same as
    flat indices into the (D * H * W) patch). ``round_offsets``: entry bounds of consecutive runs of blocks
    of which no two overlap, so a whole run can be applied at once.
    """

    starts_zyx: np.ndarray
    sizes_zyx: np.ndarray
    offsets: np.ndarray
    perms: np.ndarray
    dst: np.ndarray
    src: np.ndarray
    round_offsets: np.ndarray


def default_shuffle_blocks(shape_zyx) -> int:
    """Models Genesis' 10,000 blocks per 64 x 64 x 32 voxels, scaled to the patch volume (at least 1)."""
    return max(1, round(10_000 * int(np.prod(shape_zyx)) / _GENESIS_PATCH_VOXELS))


def shuffle_block_bounds(shape_zyx) -> np.ndarray:
    """(3,) int64 largest block side per axis: ``max(2, n // 10)`` voxels, at most the patch side ``n``."""
    shape = np.asarray(shape_zyx, dtype=np.int64)
    return np.minimum(np.maximum(shape // 10, 2), shape)


def _block_rounds(starts: np.ndarray, sizes: np.ndarray, max_run: int) -> np.ndarray:
    """Block indices (R + 1,) that cut the sequence into runs of at most ``max_run`` consecutive blocks in
    which no two overlap: block j starts a new run when it overlaps a block of the current run."""
    n = len(starts)
    lo, hi = starts.astype(np.int32), (starts + sizes).astype(np.int32)
    window = min(max_run, n - 1)
    nearest = np.full(n, window + 1, dtype=np.int64)  # distance back to the nearest overlapping block
    for d in range(window, 0, -1):
        overlap = ((lo[d:] < hi[:-d]) & (lo[:-d] < hi[d:])).all(axis=1)
        nearest[d:][overlap] = d
    bounds, run_start = [0], 0
    for j, previous in enumerate((np.arange(n) - nearest).tolist()):
        if previous >= run_start or j - run_start >= max_run:
            bounds.append(j)
            run_start = j
    bounds.append(n)
    return np.asarray(bounds, dtype=np.int64)


def plan_local_shuffle(shape_zyx, rng: np.random.Generator, n_blocks: int | None = None,
                       max_run: int = 48) -> ShufflePlan:
    """Draw ``n_blocks`` (default ``default_shuffle_blocks``) blocks as Models Genesis does: each side uniform
    in [1, ``shuffle_block_bounds``] voxels, the block uniform inside the patch, its voxels permuted uniformly.
    All draws are vectorized (blocks of one size share one ``Generator.permuted`` call)."""
    shape = np.asarray(shape_zyx, dtype=np.int64)
    n = default_shuffle_blocks(shape) if n_blocks is None else int(n_blocks)
    if n < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    high = shuffle_block_bounds(shape)
    sizes = rng.integers(1, high + 1, size=(n, 3))
    starts = rng.integers(0, shape - sizes + 1)
    volumes = sizes.prod(axis=1)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(volumes, out=offsets[1:])
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    size_class = np.ravel_multi_index(tuple((sizes - 1).T), tuple(high))
    # per block size: its voxels' flat offsets in C order (a table), and one permutation per block
    perms = np.empty(offsets[-1], dtype=np.int64)
    table, table_start, used = [], np.zeros(int(np.prod(high)), dtype=np.int64), 0
    order = np.argsort(size_class, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(size_class[order])) + 1):
        m = int(volumes[rows[0]])
        table.append(np.indices(sizes[rows[0]]).reshape(3, -1).T @ strides)
        table_start[size_class[rows[0]]], used = used, used + m
        perms[offsets[rows][:, None] + np.arange(m)] = rng.permuted(
            np.broadcast_to(np.arange(m), (len(rows), m)), axis=1)
    table = np.concatenate(table)
    corner = np.repeat(starts @ strides, volumes)
    first = np.repeat(table_start[size_class], volumes)
    local = np.arange(offsets[-1]) - np.repeat(offsets[:-1], volumes)
    dst, src = corner + table[first + local], corner + table[first + perms]
    rounds = _block_rounds(starts, sizes, max_run)
    return ShufflePlan(starts, sizes, offsets, perms, dst, src, offsets[rounds])


def apply_local_shuffle(x01: np.ndarray, plan: ShufflePlan) -> np.ndarray:
    """Apply the plan's blocks in order to a copy of ``x01`` (..., D, H, W): one gather/scatter per run of
    non-overlapping blocks, which equals shuffling the blocks one after the other (leading axes share it)."""
    out = x01.reshape(*x01.shape[:-3], -1).copy()
    bounds = plan.round_offsets
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        out[..., plan.dst[lo:hi]] = out[..., plan.src[lo:hi]]
    return out.reshape(x01.shape)


def local_pixel_shuffling(x01: np.ndarray, rng: np.random.Generator, n_blocks: int | None = None) -> np.ndarray:
    """Shuffle voxels inside many small random blocks (sides 1 to max(2, 1/10 of the patch)); blocks are shuffled
    one after the other, so the patch's multiset of values is kept. ``n_blocks`` default: 10,000 per 64x64x32
    voxels (Models Genesis), scaled to the patch volume. Vectorized (``plan_local_shuffle`` +
    ``apply_local_shuffle``): the same distribution as Models Genesis' loop at a fraction of its time."""
    _check_patch(x01)
    return apply_local_shuffle(x01, plan_local_shuffle(x01.shape[-3:], rng, n_blocks))


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
