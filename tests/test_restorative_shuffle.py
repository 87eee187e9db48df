"""The vectorized local pixel shuffling equals Models Genesis' loop: exactly on the same draws, and in
distribution against the loop as this module had it before (block sizes, block count, moved voxels)."""

import numpy as np
import pytest

from pipeline.baselines.restorative import (apply_local_shuffle, default_shuffle_blocks, local_pixel_shuffling,
                                            plan_local_shuffle, shuffle_block_bounds)


def _loop_box(rng, shape_zyx):
    """The loop version's block: each side uniform in [1, min(max(int(n * 0.1), 1, 2), n)], placed uniformly."""
    box = []
    for n in shape_zyx:
        hi = min(max(int(n * 0.1), 1, 2), n)
        size = int(rng.integers(1, hi + 1))
        start = int(rng.integers(0, n - size + 1))
        box.append(slice(start, start + size))
    return (Ellipsis, *box)


def _loop_shuffle(x01, rng, n_blocks=None):
    """Models Genesis' local pixel shuffling as a Python loop (this module's implementation before issue 14)."""
    shape = x01.shape[-3:]
    n_blocks = n_blocks or max(1, round(10_000 * int(np.prod(shape)) / (64 * 64 * 32)))
    out = x01.copy()
    for _ in range(n_blocks):
        box = _loop_box(rng, shape)
        flat = out[box].reshape(*x01.shape[:-3], -1)
        out[box] = flat[..., rng.permutation(flat.shape[-1])].reshape(out[box].shape)
    return out


def _apply_one_by_one(x01, plan):
    """The plan's blocks applied one after the other with slices (the loop, on the plan's draws)."""
    out = x01.copy()
    for j, (start, size) in enumerate(zip(plan.starts_zyx, plan.sizes_zyx)):
        box = (Ellipsis, *(slice(a, a + s) for a, s in zip(start, size)))
        flat = out[box].reshape(*x01.shape[:-3], -1)
        out[box] = flat[..., plan.perms[plan.offsets[j]:plan.offsets[j + 1]]].reshape(out[box].shape)
    return out


@pytest.mark.parametrize("shape", [(1, 8, 8, 8), (2, 16, 20, 24), (1, 32, 64, 64)])
@pytest.mark.parametrize("max_run", [1, 7, 48])
def test_vectorized_shuffle_equals_its_blocks_applied_one_by_one(shape, max_run):
    rng = np.random.default_rng(3)
    x = rng.random(shape).astype(np.float32)
    plan = plan_local_shuffle(shape[-3:], np.random.default_rng(11), max_run=max_run)
    out = apply_local_shuffle(x, plan)
    np.testing.assert_array_equal(out, _apply_one_by_one(x, plan))
    assert out.dtype == x.dtype and (out != x).mean() > 0.05
    runs = np.diff(plan.round_offsets)
    assert runs.sum() == plan.offsets[-1] and (runs > 0).all()
    if max_run == 1:
        assert len(runs) == len(plan.starts_zyx)


def test_each_block_permutes_exactly_its_own_voxels():
    shape = (12, 20, 16)
    plan = plan_local_shuffle(shape, np.random.default_rng(5))
    grid = np.arange(np.prod(shape)).reshape(shape)
    for j, (start, size) in enumerate(zip(plan.starts_zyx, plan.sizes_zyx)):
        entries = slice(plan.offsets[j], plan.offsets[j + 1])
        box = grid[tuple(slice(a, a + s) for a, s in zip(start, size))].ravel()
        perm = plan.perms[entries]
        np.testing.assert_array_equal(np.sort(perm), np.arange(box.size))  # a permutation of the block
        np.testing.assert_array_equal(plan.dst[entries], box)
        np.testing.assert_array_equal(plan.src[entries], box[perm])
        assert (start >= 0).all() and (start + size <= shape).all()


def test_runs_hold_no_overlapping_blocks():
    plan = plan_local_shuffle((16, 32, 32), np.random.default_rng(2), max_run=48)
    block_bounds = np.searchsorted(plan.offsets, plan.round_offsets)
    lo, hi = plan.starts_zyx, plan.starts_zyx + plan.sizes_zyx
    for a, b in zip(block_bounds[:-1], block_bounds[1:]):
        assert b - a <= 48
        overlap = ((lo[a:b, None] < hi[None, a:b]) & (lo[None, a:b] < hi[a:b, None])).all(axis=2)
        assert overlap.sum() == b - a  # each block with itself only


@pytest.mark.parametrize("shape", [(32, 32, 32), (32, 128, 128), (8, 9, 75), (2, 3, 200)])
def test_block_count_and_size_distribution_match_the_loop(shape):
    expected_blocks = max(1, round(10_000 * int(np.prod(shape)) / (64 * 64 * 32)))
    assert default_shuffle_blocks(shape) == expected_blocks
    plan = plan_local_shuffle(shape, np.random.default_rng(0), n_blocks=4000)
    assert len(plan.starts_zyx) == 4000
    loop_rng = np.random.default_rng(0)
    loop_sizes = np.array([[s.stop - s.start for s in _loop_box(loop_rng, shape)[1:]] for _ in range(4000)])
    for axis, n in enumerate(shape):
        high = min(max(int(n * 0.1), 1, 2), n)
        assert shuffle_block_bounds(shape)[axis] == high
        vec = np.bincount(plan.sizes_zyx[:, axis], minlength=high + 1)[1:] / 4000
        loop = np.bincount(loop_sizes[:, axis], minlength=high + 1)[1:] / 4000
        assert len(vec) == len(loop) == high  # same support: 1 .. high voxels
        # both uniform over 1..high: 4000 draws put each frequency within 5 standard errors of 1 / high
        tol = 5 * np.sqrt((1 / high) * (1 - 1 / high) / 4000)
        assert np.abs(vec - 1 / high).max() < tol and np.abs(loop - 1 / high).max() < tol


def _moves(out_index, shape):
    """Fraction of voxels whose value moved, and the mean distance (voxels) a value travelled."""
    here = np.indices(shape).reshape(3, -1)
    came_from = np.stack(np.unravel_index(out_index.ravel(), shape))
    moved = (came_from != here).any(axis=0)
    return moved.mean(), np.abs(came_from - here).sum(axis=0).mean()


def test_moved_voxels_match_the_loop_in_distribution():
    shape = (16, 32, 32)
    last = np.prod(shape) - 1
    index01 = (np.arange(last + 1, dtype=np.float64) / last).reshape(1, *shape)  # each voxel knows its origin

    def origin(out01):
        return np.rint(out01[0] * last).astype(np.int64)

    vec = np.array([_moves(origin(local_pixel_shuffling(index01, np.random.default_rng(s))), shape)
                    for s in range(24)])
    loop = np.array([_moves(origin(_loop_shuffle(index01, np.random.default_rng(100 + s))), shape)
                     for s in range(24)])
    for k in range(2):  # moved fraction, mean travel: equal means within 5 standard errors
        se = np.sqrt(vec[:, k].var() / len(vec) + loop[:, k].var() / len(loop))
        assert abs(vec[:, k].mean() - loop[:, k].mean()) < 5 * se + 1e-9, (k, vec[:, k].mean(), loop[:, k].mean())
    assert 0.2 < vec[:, 0].mean() < 0.6  # small blocks: a share of the voxels moves


def test_values_are_kept_and_input_untouched_and_seeded():
    x = np.random.default_rng(0).random((2, 8, 16, 16)).astype(np.float32)
    before = x.copy()
    a = local_pixel_shuffling(x, np.random.default_rng(9))
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(a, local_pixel_shuffling(x, np.random.default_rng(9)))
    for c in range(2):
        np.testing.assert_array_equal(np.sort(a[c], axis=None), np.sort(x[c], axis=None))
    # channels share one shuffle
    same = np.broadcast_to(x[:1], x.shape).copy()
    b = local_pixel_shuffling(same, np.random.default_rng(9))
    np.testing.assert_array_equal(b[0], b[1])
    with pytest.raises(ValueError, match="n_blocks"):
        plan_local_shuffle((8, 8, 8), np.random.default_rng(0), n_blocks=0)
