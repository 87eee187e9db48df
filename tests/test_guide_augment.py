"""Strong intensity augmentation of guide crops (scanner, kernel, contrast phase)."""

import numpy as np

from pipeline.guide.augment import augment_crop, hu_to_unit, soft_tissue_weight
from pipeline.guide.crops import augment_intensity
from pipeline.data.inputs import scale_hu
from pipeline.guide.model import GUIDE_WINDOW_HU


def test_soft_tissue_weight_is_one_mid_band_and_zero_for_air_fat_bone():
    hu = np.array([-1000.0, -300.0, -100.0, 100.0, 300.0, 1000.0])
    w = soft_tissue_weight(scale_hu(hu, GUIDE_WINDOW_HU))
    np.testing.assert_allclose(w, [0, 0, 0, 1, 0, 0], atol=1e-6)


def test_defaults_are_the_original_recipe_and_deterministic():
    img = np.random.default_rng(0).uniform(0, 1, (8, 9, 10)).astype(np.float32)
    a = augment_crop(img, np.random.default_rng(5))
    np.testing.assert_array_equal(a, augment_intensity(img, np.random.default_rng(5)))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1


def test_shift_boost_and_blur_change_the_crop_as_intended():
    hu = np.full((6, 8, 8), 100.0)                          # soft tissue
    hu[:, :, :4] = -1000.0                                  # air
    img = scale_hu(hu, GUIDE_WINDOW_HU)
    mild = dict(gamma_range=(1, 1), contrast_range=(1, 1), noise_std_max=0.0)
    boosted = augment_crop(img, np.random.default_rng(0), soft_tissue_boost_hu=200.0, **mild)
    assert np.all(boosted[:, :, :4] == 0) and np.all(boosted[:, :, 4:] > img[:, :, 4:])
    assert np.all(boosted[:, :, 4:] - img[:, :, 4:] <= hu_to_unit(200.0) + 1e-6)
    shifted = augment_crop(img, np.random.default_rng(1), shift_hu=100.0, **mild)
    delta = shifted[:, :, 4:] - img[:, :, 4:]
    assert np.ptp(delta) < 1e-6 and 0 < abs(delta.flat[0]) <= hu_to_unit(100.0)
    blurred = augment_crop(img, np.random.default_rng(2), blur_sigma_max_vox=2.0, **mild)
    assert np.ptp(blurred[:, :, 3]) >= 0 and blurred[0, 0, 3] > 0              # the edge is smeared into air
    assert augment_crop(img[0], np.random.default_rng(3), blur_sigma_max_vox=1.0).shape == (8, 8)   # 2-D slices
