"""The label-free consistency score and the organ separation in mm, on hand-built coordinates."""

import numpy as np
import pytest

from pipeline.data.inputs import body_bbox_zyx
from pipeline.guide.consistency import (bodybox_scale_mm, read_map_at_mm, rms_mm, sample_views, scan_consistency_mm,
                                        view_disagreement_mm)
from pipeline.guide.scoring import organ_separation_mm

SCALE_MM = np.array([400.0, 300.0, 200.0])


def _physical_map(shape, origin_mm, spacing_mm, offset=(0.0, 0.0, 0.0)):
    """(3, D, H, W) coordinates = physical position / SCALE_MM (+ offset): a perfectly consistent frame."""
    grids = np.meshgrid(*[origin_mm[a] + np.arange(n) * spacing_mm[a] for a, n in enumerate(shape)], indexing="ij")
    return np.stack([g / s + o for g, s, o in zip(grids, SCALE_MM, offset)]).astype(np.float32)


def test_a_consistent_frame_disagrees_by_zero_mm_and_an_offset_shows_on_its_axis_only():
    spacing = np.array([3.0, 2.0, 2.0])
    ref = _physical_map((20, 24, 22), (0, 0, 0), spacing)
    origin, view_spacing = np.array([7.5, 5.0, 3.0]), np.array([4.0, 2.5, 3.0])
    view = _physical_map((8, 10, 9), origin, view_spacing)
    d = view_disagreement_mm(ref, spacing, view, origin, view_spacing, SCALE_MM)
    assert d.shape == (8 * 10 * 9, 3) and np.abs(d).max() < 1e-3
    shifted = _physical_map((8, 10, 9), origin, view_spacing, offset=(0.01, 0.0, 0.0))
    rms = rms_mm([view_disagreement_mm(ref, spacing, shifted, origin, view_spacing, SCALE_MM)])
    np.testing.assert_allclose(rms, [4.0, 0.0, 0.0], atol=1e-3)   # 0.01 units x 400 mm per unit


def test_disagreement_uses_only_masked_points_and_at_most_max_points():
    spacing = np.ones(3)
    ref = _physical_map((10, 10, 10), (0, 0, 0), spacing)
    view = _physical_map((10, 10, 10), (0, 0, 0), spacing, offset=(0.0, 0.1, 0.0))
    mask = np.zeros((10, 10, 10), bool)
    mask[2:4, 2:4, 2:4] = True
    assert view_disagreement_mm(ref, spacing, view, np.zeros(3), spacing, SCALE_MM, mask).shape == (8, 3)
    capped = view_disagreement_mm(ref, spacing, view, np.zeros(3), spacing, SCALE_MM, max_points=5,
                                  rng=np.random.default_rng(0))
    assert capped.shape == (5, 3) and np.allclose(capped[:, 1], 30.0, atol=1e-3)
    assert view_disagreement_mm(ref, spacing, view, np.zeros(3), spacing, SCALE_MM, ~np.ones_like(mask)).shape == (0, 3)
    assert np.isnan(rms_mm([np.zeros((0, 3))])).all()


def test_read_map_at_mm_is_trilinear_in_physical_space():
    spacing = np.array([2.0, 1.0, 4.0])
    cmap = _physical_map((6, 6, 6), (0, 0, 0), spacing)
    pts = np.array([[3.0, 2.5, 6.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(read_map_at_mm(cmap, spacing, pts), pts / SCALE_MM, atol=1e-6)


def test_views_lie_inside_the_scan_with_spacing_and_extent_in_range():
    shape, spacing = (40, 30, 50), np.array([3.0, 2.0, 1.0])
    extent = (np.array(shape) - 1) * spacing
    for v in sample_views(shape, spacing, np.random.default_rng(0), 20):
        assert np.all(v["spacing_zyx_mm"] >= 0.75 * spacing - 1e-9) and np.all(v["spacing_zyx_mm"] <= 1.5 * spacing)
        last = v["origin_zyx_mm"] + (v["size_zyx"] - 1) * v["spacing_zyx_mm"]
        assert np.all(v["origin_zyx_mm"] >= 0) and np.all(last <= extent + 1e-6) and np.all(v["size_zyx"] >= 8)


def test_scan_consistency_of_a_frame_that_reads_height_from_the_image_is_near_zero_and_beats_the_body_box():
    """HU = height in mm: a 'guide' returning HU / scale on z sees the same z wherever a view is cut; the body
    box of a cropped view moves with the crop."""
    spacing = np.array([2.0, 2.0, 2.0])
    shape = (60, 20, 20)
    volume = np.broadcast_to((np.arange(shape[0]) * spacing[0])[:, None, None], shape).astype(np.int16)
    mask = np.zeros(shape, bool)
    mask[5:55, 4:16, 4:16] = True

    def predict(hu):
        return np.stack([hu / SCALE_MM[0], np.zeros(hu.shape), np.zeros(hu.shape)]).astype(np.float32)

    d = scan_consistency_mm(predict, volume, spacing, mask, SCALE_MM, np.random.default_rng(1), n_views=4)
    learned, box = rms_mm([d["learned"]]), rms_mm([d["bodybox"]])
    assert learned[0] < 1.0 and learned[1] == 0 and learned[2] == 0     # trilinear rounding only (int16 HU)
    assert box[0] > 5 * max(learned[0], 0.2)
    assert len(d["learned"]) == len(d["bodybox"]) > 0


def test_body_box_scale_and_bbox():
    mask = np.zeros((5, 6, 7), bool)
    assert body_bbox_zyx(mask) == ((0, 4), (0, 5), (0, 6))
    mask[1:4, 2:3, 0:7] = True
    assert body_bbox_zyx(mask) == ((1, 3), (2, 2), (0, 6))
    np.testing.assert_allclose(bodybox_scale_mm(mask, (2.0, 3.0, 1.0)), [4.0, 3.0, 6.0])   # one voxel at least


def test_organ_separation_mm_per_axis_with_the_frames_scale():
    vols = [{1: np.array([0.0, 0.0, 0.0]), 2: np.array([0.1, 0.2, 0.0])},
            {1: np.array([0.5, 0.5, 0.5]), 2: np.array([0.7, 0.5, 0.6])},   # origins cancel within a volume
            {3: np.array([9.0, 9.0, 9.0])}]                                 # no pair: ignored
    np.testing.assert_allclose(organ_separation_mm(vols), [0.15, 0.1, 0.05])
    np.testing.assert_allclose(organ_separation_mm(vols, SCALE_MM), [60.0, 30.0, 10.0])
    with pytest.raises(ValueError, match="2 organs"):
        organ_separation_mm([{1: np.zeros(3)}])
