"""Models Genesis corruptions: shape/dtype/range kept, each transform does what it claims, seeded."""

import numpy as np
import pytest

from pipeline.baselines.restorative import (bezier_curve, genesis_corrupt, genesis_corrupt_batch, in_painting,
                                            local_pixel_shuffling, nonlinear_intensity, out_painting)


def _patch(shape=(1, 16, 16, 8), seed=0):
    """A smooth [0, 1] float32 patch (shuffling a constant would change nothing)."""
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape[-3:]), indexing="ij")
    vol = (0.5 + 0.25 * np.sin(6 * z) * np.cos(5 * y) + 0.2 * x).clip(0, 1)
    return np.broadcast_to(vol, shape).astype(np.float32).copy()


def test_bezier_curve_endpoints_and_line():
    xs, ys = bezier_curve(np.array([[0, 0], [1 / 3, 1 / 3], [2 / 3, 2 / 3], [1, 1]], float), n_times=11)
    np.testing.assert_allclose(xs, np.linspace(0, 1, 11), atol=1e-12)
    np.testing.assert_allclose(ys, xs, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_nonlinear_intensity_is_a_monotone_map_of_unit_range(seed):
    x = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 101, 1, 1).repeat(2, axis=2).repeat(2, axis=3)
    out = nonlinear_intensity(x, np.random.default_rng(seed))
    curve = out[0, :, 0, 0]
    assert out.dtype == np.float32 and out.shape == x.shape
    diffs = np.diff(curve)
    assert (diffs >= -1e-6).all() or (diffs <= 1e-6).all()
    assert {round(float(curve[0]), 5), round(float(curve[-1]), 5)} == {0.0, 1.0}


def test_local_pixel_shuffling_keeps_values_and_moves_them():
    x = _patch()
    out = local_pixel_shuffling(x, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(x, axis=None))
    assert (out != x).mean() > 0.05
    assert (out == x).mean() > 0.3  # blocks are small: most voxels stay near their place


def test_in_painting_replaces_some_boxes():
    x = _patch()
    out = in_painting(x, np.random.default_rng(1))
    changed = out != x
    assert 0 < changed.mean() < 0.5
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


def test_out_painting_keeps_some_boxes():
    x = _patch()
    out = out_painting(x, np.random.default_rng(2))
    kept = out == x
    assert (3 / 7 * 0.9) ** 3 < kept.mean() < 0.9
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


def test_genesis_corrupt_properties_and_determinism():
    x = _patch()
    for seed in range(12):
        out = genesis_corrupt(x, np.random.default_rng(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert 0 <= out.min() and out.max() <= 1
        assert np.abs(out - x).mean() > 1e-3
        np.testing.assert_array_equal(out, genesis_corrupt(x, np.random.default_rng(seed)))
    assert not np.array_equal(genesis_corrupt(x, np.random.default_rng(0)),
                              genesis_corrupt(x, np.random.default_rng(1)))
    untouched = genesis_corrupt(x, np.random.default_rng(0), local_rate=0, nonlinear_rate=0, paint_rate=0)
    assert (untouched != x).any()  # never returns the input unchanged
    np.testing.assert_array_equal(x, _patch())  # input not modified in place


def test_genesis_corrupt_batch_and_errors():
    batch = np.stack([_patch(), _patch()])
    out = genesis_corrupt_batch(batch, np.random.default_rng(0))
    assert out.shape == batch.shape and not np.array_equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        genesis_corrupt(_patch() * 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="D, H, W"):
        genesis_corrupt(np.zeros((4, 4), np.float32), np.random.default_rng(0))
