"""Guide crop pairs: physical positions are right, crops overlap, only the needed region is read."""

import numpy as np
import pytest

from pipeline.guide.crops import (augment_intensity, crop_positions_mm, mask_blocks, resample_crop,
                                  sample_crop_pair)

SPACING = np.array([3.0, 1.5, 2.0])
SHAPE = (40, 64, 56)
COEF_HU_PER_MM = np.array([2.0, 1.0, 0.5])                            # distinct per axis


def _ramp_volume():
    """int16 HU that is a linear function of the physical position (z, y, x) mm: -900 + COEF . pos."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    pos = np.stack([k, j, i], axis=-1) * SPACING
    return np.round(-900 + pos @ COEF_HU_PER_MM).astype(np.int16)


def _grid_positions(origin, spacing, size):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    return crop_positions_mm(origin, spacing, idx)


class RecordingVolume:
    """Array stand-in that records which region ``cut_patch`` reads."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim, self.read = arr, arr.shape, arr.dtype, arr.ndim, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.arr[key]


def test_crop_intensities_match_their_physical_positions():
    vol = _ramp_volume()
    window = (-1000.0, 300.0)
    box = ((10, 30), (20, 44), (15, 40))                               # keep crops inside the volume
    pair = sample_crop_pair(vol, SPACING, (8, 12, 10), np.random.default_rng(0), centre_box_zyx=box,
                            window_hu=window, augment=False, max_shift_fraction=0.5)
    assert pair["image"].shape == (2, 1, 8, 12, 10) and pair["image"].dtype == np.float32
    for c in range(2):
        pos = _grid_positions(pair["origin_zyx_mm"][c], pair["spacing_zyx_mm"][c], (8, 12, 10))
        want_hu = -900 + pos @ COEF_HU_PER_MM                           # trilinear is exact on a ramp
        got_hu = pair["image"][c, 0] * (window[1] - window[0]) + window[0]
        np.testing.assert_allclose(got_hu, want_hu, atol=0.6)          # int16 rounding of the volume


def test_spacings_in_range_and_crops_overlap():
    rng = np.random.default_rng(1)
    for _ in range(20):
        pair = sample_crop_pair(_ramp_volume(), SPACING, (16, 16, 16), rng, spacing_range_mm=(1.0, 4.0),
                                augment=False)
        sp, org = pair["spacing_zyx_mm"], pair["origin_zyx_mm"]
        assert sp.shape == (2, 3) and np.all((sp >= 1.0) & (sp <= 4.0))
        last = org + 15 * sp
        overlap = np.minimum(last[0], last[1]) - np.maximum(org[0], org[1])
        assert np.all(overlap >= 0.75 * 15 * sp.min(axis=0) - 1e-9)  # shift <= a quarter of the smaller crop


def test_default_spacing_range_scales_volume_spacing():
    pair = sample_crop_pair(_ramp_volume(), SPACING, (8, 8, 8), np.random.default_rng(2), augment=False)
    ratio = pair["spacing_zyx_mm"] / SPACING
    assert np.all((ratio >= 0.75) & (ratio <= 1.5))


def test_reads_only_the_covered_region():
    rec = RecordingVolume(_ramp_volume())
    sample_crop_pair(rec, SPACING, (8, 8, 8), np.random.default_rng(3), augment=False)
    assert len(rec.read) == 2
    for key in rec.read:
        assert np.prod([s.stop - s.start for s in key]) < 0.1 * np.prod(SHAPE)


def test_body_mask_is_resampled_and_outside_is_padding():
    vol = _ramp_volume()
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :32] = 1                                                    # body = y < 32 voxels = 48 mm
    pair = sample_crop_pair(vol, SPACING, (8, 8, 8), np.random.default_rng(4), mask_zyx=mask, augment=False,
                            centre_box_zyx=((20, 20), (32, 32), (28, 28)))
    for c in range(2):
        y_mm = pair["origin_zyx_mm"][c, 1] + np.arange(8) * pair["spacing_zyx_mm"][c, 1]
        want = np.round(y_mm / SPACING[1]) < 32
        np.testing.assert_array_equal(pair["body"][c].any(axis=(0, 2)), want)
    crop = resample_crop(vol, SPACING, np.array([-30.0, 0, 0]), SPACING, (4, 2, 2), fill=-1024)
    assert np.all(crop[:3] == -1024)                                   # z < 0 mm is outside the scan


def test_augmentation_and_masking_stay_in_range_and_are_seeded():
    a = sample_crop_pair(_ramp_volume(), SPACING, (16, 16, 16), np.random.default_rng(5))
    b = sample_crop_pair(_ramp_volume(), SPACING, (16, 16, 16), np.random.default_rng(5))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].min() >= 0 and a["image"].max() <= 1
    img = np.full((16, 16, 16), 0.5, np.float32)
    masked = mask_blocks(img, np.random.default_rng(0), max_blocks=4, size_fraction=(0.25, 0.25))
    zeros = int((masked == 0).sum())
    assert 0 < zeros <= 4 * 4 ** 3 and np.all(masked[masked != 0] == 0.5)
    changed = augment_intensity(img, np.random.default_rng(1))
    assert changed.dtype == np.float32 and not np.allclose(changed, img)


@pytest.mark.parametrize("kwargs,match", [
    ({"crop_size_zyx": (8, 8)}, "crop_size_zyx"),
    ({"spacing_zyx_mm": (1.0, 0.0, 1.0)}, "spacing_zyx_mm"),
    ({"spacing_range_mm": (2.0, 1.0)}, "spacing_range_mm"),
    ({"max_shift_fraction": 1.5}, "max_shift_fraction"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"volume_hu_zyx": _ramp_volume(), "spacing_zyx_mm": SPACING, "crop_size_zyx": (8, 8, 8),
            "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_crop_pair(**args)


def test_scan_end_cut_blanks_one_crop_beyond_a_slice():
    from pipeline.guide.crops import cut_scan_end

    rng = np.random.default_rng(0)
    image, body = np.full((16, 4, 4), 0.5, np.float32), np.ones((16, 4, 4), bool)
    cut_image, cut_body = cut_scan_end(image, body, rng)
    blank = np.flatnonzero((cut_image == 0).all(axis=(1, 2)))
    assert 0 < blank.size <= 12 and (np.all(np.diff(blank) == 1))          # one contiguous end, 4..12 slices
    assert blank[0] == 0 or blank[-1] == 15
    np.testing.assert_array_equal(cut_body, cut_image > 0)
    assert (image == 0.5).all() and body.all()                             # inputs untouched
    vol = (np.arange(40)[:, None, None] * 20 - 400 + np.zeros((40, 24, 24))).astype(np.int16)
    pair = sample_crop_pair(vol, (2.0, 2.0, 2.0), (16, 16, 16), rng, scan_end_probability=1.0, augment=True,
                            max_blocks=0)
    blanked = [bool((~pair["body"][c]).all(axis=(1, 2)).any()) for c in range(2)]
    assert sum(blanked) == 1                                               # exactly one crop of the pair
