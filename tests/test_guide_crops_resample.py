"""The separable crop resampler gives scipy's ``map_coordinates`` values (order 1 and 0, mode "nearest")."""

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from pipeline.data.patches import cut_patch
from pipeline.guide.crops import resample_crop


def _scipy_crop(volume, spacing, origin, crop_spacing, size, fill, order):
    """The reference: the covered region resampled by ``map_coordinates`` on the full crop grid."""
    axes = [(origin[a] + np.arange(n) * crop_spacing[a]) / spacing[a] for a, n in enumerate(size)]
    lo = np.array([int(np.floor(ax[0])) for ax in axes])
    hi = np.array([int(np.floor(ax[-1])) + 2 for ax in axes])
    region = cut_patch(volume, lo, tuple(hi - lo), fill).astype(np.float32)
    grid = np.meshgrid(*[ax - s for ax, s in zip(axes, lo)], indexing="ij")
    return map_coordinates(region, grid, order=order, mode="nearest").astype(np.float32)


@pytest.mark.parametrize("seed", range(8))
def test_resample_crop_matches_map_coordinates(seed):
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 1500, size=(30, 41, 37)).astype(np.int16)
    mask = (rng.random((30, 41, 37)) < 0.5).astype(np.uint8)
    spacing = rng.uniform(0.7, 3.0, 3)
    size = tuple(int(n) for n in rng.integers(3, 14, 3))
    crop_spacing = spacing * rng.uniform(0.6, 1.6, 3)
    origin = rng.uniform(-10, 1.2, 3) * spacing * np.array([30, 41, 37]) / 10  # partly outside the volume
    got = resample_crop(volume, spacing, origin, crop_spacing, size, fill=-1024)
    want = _scipy_crop(volume, spacing, origin, crop_spacing, size, -1024, 1)
    assert got.dtype == np.float32 and got.shape == size
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)  # float32 vs scipy's float64 arithmetic
    got0 = resample_crop(mask, spacing, origin, crop_spacing, size, fill=0, order=0)
    np.testing.assert_array_equal(got0, _scipy_crop(mask, spacing, origin, crop_spacing, size, 0, 0))
    assert got0.dtype == np.float32


def test_resample_crop_rejects_other_orders():
    with pytest.raises(ValueError, match="order"):
        resample_crop(np.zeros((4, 4, 4)), (1, 1, 1), (0, 0, 0), (1, 1, 1), (2, 2, 2), 0, order=3)
