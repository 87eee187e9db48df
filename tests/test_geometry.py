"""Canonical orientation, resampling, label placement in physical space, body mask and box (pure functions)."""

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.ingest.body import bbox_zyx, body_mask
from pipeline.ingest.geometry import (crop_to_bbox, physical_bounds_xyz_mm, resample_label_onto,
                                      resample_to_spacing, to_canonical)


def _image(array_zyx, spacing_xyz=(1.0, 1.0, 1.0), origin_xyz=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin_xyz)
    if direction is not None:
        img.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return img


def _canonical_a():
    """(Z, Y, X) = (6, 7, 8) random int16, spacing x 1.5, y 2, z 3 mm, identity direction."""
    arr = np.random.default_rng(0).integers(-1000, 1000, size=(6, 7, 8)).astype(np.int16)
    return arr, _image(arr, (1.5, 2.0, 3.0), (10.0, 20.0, 30.0))


def test_permuted_flipped_direction_becomes_the_canonical_image():
    arr_a, a = _canonical_a()
    Z, Y, _ = arr_a.shape
    # the same voxels stored as B: index i' runs S->I, j' runs R->L, k' runs P->A
    cols = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float).T  # column c = LPS vector of axis c
    arr_b = arr_a[::-1, ::-1, :].transpose(1, 2, 0)
    origin_b = (10.0, 20.0 + (Y - 1) * 2.0, 30.0 + (Z - 1) * 3.0)
    b = _image(arr_b, (3.0, 1.5, 2.0), origin_b, cols)
    assert b.TransformIndexToPhysicalPoint((2, 3, 4)) == pytest.approx(a.TransformIndexToPhysicalPoint((3, 2, 3)))

    out = to_canonical(b)
    assert out.GetDirection() == tuple(np.eye(3).ravel())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr_a)  # (z, y, x) = (S, P, L)
    assert out.GetSpacing() == pytest.approx(a.GetSpacing())
    assert out.GetOrigin() == pytest.approx(a.GetOrigin())


def test_oblique_image_is_resampled_onto_an_axis_aligned_grid():
    arr = np.full((20, 20, 20), -1000, np.int16)
    arr[8:12, 4:8, 12:16] = 1000  # a bright cube
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    img = _image(arr, (2.0, 2.0, 2.0), (5.0, -7.0, 3.0), rot)
    centre_mm = np.asarray(img.TransformContinuousIndexToPhysicalPoint((13.5, 5.5, 9.5)))

    out = to_canonical(img)
    assert out.GetDirection() == tuple(np.eye(3).ravel())
    out_arr = sitk.GetArrayFromImage(out)
    k, j, i = np.nonzero(out_arr > 0)
    found_mm = np.asarray(out.GetOrigin()) + np.stack([i, j, k], 1).mean(0) * np.asarray(out.GetSpacing())
    assert np.linalg.norm(found_mm - centre_mm) < 1.0
    lo, hi = physical_bounds_xyz_mm(img)
    assert np.all(np.asarray(physical_bounds_xyz_mm(out)[0]) <= lo + 2.0)
    assert np.all(np.asarray(physical_bounds_xyz_mm(out)[1]) >= hi - 2.0)


def test_resampling_keeps_the_physical_extent_and_a_linear_ramp():
    # x ramp: value = physical x in mm
    size_xyz, spacing_xyz, origin = (10, 12, 7), (1.5, 1.5, 4.0), (-3.0, 2.0, 100.0)
    x_mm = origin[0] + np.arange(size_xyz[0]) * spacing_xyz[0]
    arr = np.broadcast_to(x_mm, size_xyz[::-1]).astype(np.float32)
    img = _image(arr, spacing_xyz, origin)

    out = resample_to_spacing(img, (2.0, 3.0, 3.0))
    assert out.GetSize() == (5, 6, 14)
    assert out.GetSpacing() == pytest.approx((3.0, 3.0, 2.0))
    for a, b in zip(physical_bounds_xyz_mm(out), physical_bounds_xyz_mm(img)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    out_arr = sitk.GetArrayFromImage(out)
    x_out = out.GetOrigin()[0] + np.arange(5) * 3.0
    np.testing.assert_allclose(out_arr[5, 3, 1:-1], x_out[1:-1], atol=1e-3)  # interior: exact for a ramp


def test_label_resampling_is_nearest_and_keeps_values():
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 6
    lab[3, 3, 3] = 1
    out = resample_to_spacing(_image(lab), (0.5, 2.0, 2.0), is_label=True)
    vals = sitk.GetArrayFromImage(out)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(vals)) <= {0, 1, 6}
    assert (vals == 6).sum() * 0.5 * 2 * 2 == pytest.approx((lab == 6).sum(), rel=0.3)


def test_label_with_flipped_x_direction_lands_on_the_right_voxels():
    arr = np.random.default_rng(1).integers(-100, 100, size=(6, 8, 10)).astype(np.int16)
    image = _image(arr, (2.0, 2.0, 3.0), (-50.0, 10.0, 0.0))
    truth = np.zeros(arr.shape, np.uint8)
    truth[1:4, 2:5, 1:3] = 6   # liver on the right (low x)
    truth[2:5, 3:6, 7:9] = 1   # spleen on the left
    # the label file stores x from Left to Right: flipped array, direction -1 along x, origin at max x
    flipped = _image(truth[:, :, ::-1].copy(), (2.0, 2.0, 3.0), (-50.0 + 9 * 2.0, 10.0, 0.0),
                     np.diag([-1.0, 1.0, 1.0]))
    out = sitk.GetArrayFromImage(resample_label_onto(flipped, image))
    np.testing.assert_array_equal(out, truth)
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), truth)  # index matching would be wrong


def test_crop_keeps_the_physical_origin():
    arr, img = _canonical_a()
    box = (slice(1, 4), slice(2, 7), slice(3, 5))
    crop = crop_to_bbox(img, box)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), arr[box])
    assert crop.GetOrigin() == pytest.approx(img.TransformIndexToPhysicalPoint((3, 2, 1)))


def _patient_on_table(gap: int = 0):
    """(20, 64, 64) HU: elliptic body (40 HU) with a lung (-850 HU) inside; a 3-voxel table (200 HU) under it."""
    vol = np.full((20, 64, 64), -1000.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    body2d = ((yy - 28) / 20.0) ** 2 + ((xx - 32) / 22.0) ** 2 <= 1
    lung2d = ((yy - 24) / 6.0) ** 2 + ((xx - 24) / 6.0) ** 2 <= 1
    vol[2:18][:, body2d] = 40
    vol[2:18][:, lung2d] = -850
    table = np.zeros(vol.shape, bool)
    table[:, 49 + gap:52 + gap, 1:63] = True  # body's lowest row is y = 48
    vol[table] = 200
    body = np.zeros(vol.shape, bool)
    body[2:18][:, body2d] = True
    return vol, body, table


@pytest.mark.parametrize("gap", [0, 2])
def test_body_mask_keeps_the_body_fills_the_lung_and_drops_the_table(gap):
    vol, body, table = _patient_on_table(gap)
    mask = body_mask(vol, threshold_hu=-500)
    assert mask.dtype == bool and mask.shape == vol.shape
    assert mask[body].all()                      # whole body, lung hole filled
    assert mask[table].mean() < 0.1              # table at most touches the body's edge
    assert not mask[:, :, :8].any() and not mask[:, :, 57:].any()


def test_body_mask_without_opening_would_keep_a_touching_table():
    vol, _, table = _patient_on_table(0)
    assert body_mask(vol, opening_vox=0)[table].all()  # why body_mask opens each slice first


def test_bbox_with_margin_is_clipped_to_the_array():
    mask = np.zeros((10, 12, 14), bool)
    mask[3:5, 0:2, 9:14] = True
    assert bbox_zyx(mask) == (slice(3, 5), slice(0, 2), slice(9, 14))
    assert bbox_zyx(mask, (2, 2, 2)) == (slice(1, 7), slice(0, 4), slice(7, 14))
    with pytest.raises(ValueError, match="empty"):
        bbox_zyx(np.zeros((3, 3, 3), bool))


@pytest.mark.parametrize("direction", [None, np.diag([1.0, -1.0, -1.0])])
@pytest.mark.parametrize("spacing_zyx", [(2.0, 1.0, 1.0), (3.0, 3.0, 3.0), (0.7, 1.5, 1.2)])
def test_slab_resampling_equals_the_whole_volume_resampling(spacing_zyx, direction):
    """resample_hu_int16 (separable matrices, slab by slab) = resample_to_spacing (scipy Gaussian + ITK
    linear) rounded to int16, to within 1 HU of rounding, whatever the slab size and direction."""
    from scipy import ndimage

    from pipeline.ingest.geometry import resample_hu_int16

    rng = np.random.default_rng(3)
    arr = (3 * ndimage.gaussian_filter(rng.normal(0, 300, size=(41, 30, 35)), 1)).astype(np.int16)
    img = _image(arr, (0.8, 0.8, 1.0), (3.0, -5.0, 100.0), direction)
    whole = np.clip(np.rint(sitk.GetArrayFromImage(resample_to_spacing(img, spacing_zyx))), -1024, 3071)
    for slab_voxels in (1 << 22, 700):
        out, grid = resample_hu_int16(img, spacing_zyx, slab_voxels=slab_voxels)
        assert out.dtype == np.int16 and out.shape == whole.shape
        assert np.abs(out.astype(int) - whole).max() <= 1
    ref = resample_to_spacing(img, spacing_zyx)
    assert grid.size_xyz == ref.GetSize() and grid.spacing_xyz == pytest.approx(ref.GetSpacing())
    assert grid.origin_xyz == pytest.approx(ref.GetOrigin()) and grid.point((1, 2, 3)) == pytest.approx(
        ref.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0)))


def test_already_canonical_image_is_not_copied():
    _, a = _canonical_a()
    assert to_canonical(a) is a


def test_fill_holes_of_all_slices_at_once_equals_slice_by_slice():
    from scipy import ndimage

    from pipeline.ingest.body import fill_holes_per_slice

    mask = np.random.default_rng(0).random((6, 20, 24)) > 0.45
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    np.testing.assert_array_equal(fill_holes_per_slice(mask), expected)


def test_coarse_body_mask_matches_full_resolution_with_an_exact_skin_line():
    from pipeline.ingest.body import coarse_factors

    vol, body, table = _patient_on_table(2)
    big = vol.repeat(3, axis=1).repeat(3, axis=2)          # 64 x 64 slices -> 192 x 192 at "1 mm"
    full = body_mask(big)
    coarse = body_mask(big, spacing_zyx_mm=(3.0, 1.0, 1.0), coarse_mm=3.0)
    assert coarse_factors((3.0, 1.0, 1.0), 3.0) == (1, 3, 3)
    dice = 2 * (full & coarse).sum() / (full.sum() + coarse.sum())
    assert dice > 0.995
    assert not (coarse & (big <= -500) & ~full).any() or dice > 0.999   # no air added outside the body
    assert coarse[body.repeat(3, axis=1).repeat(3, axis=2)].all()        # lung hole still filled
    small = body_mask(vol, spacing_zyx_mm=(1.0, 0.5, 0.5))               # too few blocks: full resolution
    np.testing.assert_array_equal(small, body_mask(vol))


def test_integer_hu_histogram_equals_the_float_histogram():
    from pipeline.ingest.report import HU_EDGES, hu_histogram

    rng = np.random.default_rng(0)
    values = rng.integers(-3000, 4000, size=(30, 40, 50)).astype(np.int16)
    values.flat[:4] = [2000, -1024, 3071, -1025]
    mask = rng.random(values.shape) > 0.3
    expected = np.histogram(np.clip(values[mask].astype(float), HU_EDGES[0], HU_EDGES[-1]), bins=HU_EDGES)[0]
    np.testing.assert_array_equal(hu_histogram(values, mask), expected)
    np.testing.assert_array_equal(hu_histogram(values[mask].astype(np.float32)), expected)
