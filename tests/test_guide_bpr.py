"""The 1-D body-part regression guide: slices, losses, the model, its file and its (3, D, H, W) map."""

import numpy as np
import pytest
import torch

from pipeline.guide.bpr import (BodyPartRegressor, bpr_coords, bpr_loss, body_bbox_from_hu, resample_slices,
                                sample_slice_set, slice_consistency_loss, slice_distance_loss)
from pipeline.guide.inference import guide_kind, guide_scale_mm, load_guide, predict_coords, save_guide
from pipeline.guide.scoring import monotonic_fraction


def _toy_scan(depth=40, seed=0):
    """A body whose cross-section changes with height: a disc whose radius and HU grow along z."""
    rng = np.random.default_rng(seed)
    vol = np.full((depth, 32, 32), -1000, np.int16)
    yy, xx = np.mgrid[:32, :32]
    for k in range(depth):
        r = 6 + 8 * k / depth
        vol[k][(yy - 16) ** 2 + (xx - 16) ** 2 < r * r] = int(-100 + 10 * k)
    return vol + rng.integers(-5, 5, vol.shape).astype(np.int16)


def test_resample_slices_maps_the_box_corners_onto_the_first_and_last_pixel():
    vol = np.broadcast_to(np.arange(10)[None, None, :] * 10, (3, 8, 10)).astype(np.int16)
    out = resample_slices(vol, np.array([0, 2]), ((0, 7), (2, 8)), 4)
    assert out.shape == (2, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [20, 40, 60, 80])
    out = resample_slices(vol, np.array([1]), ((-4, 3), (0, 9)), 2)      # outside the scan: air
    assert out[0, 0, 0] == -1024


def test_slice_distance_loss_is_zero_for_scores_in_mm_up_to_a_shift_and_positive_when_reversed():
    z = torch.tensor([[0.0, 30.0, 90.0, 150.0]])
    scale = torch.tensor([600.0])
    good = 0.2 + z / 600.0
    assert float(slice_distance_loss(good, z, scale)) < 1e-10
    assert float(slice_distance_loss(good.flip(1), z, scale)) > 1.0
    half = torch.tensor([300.0], requires_grad=True)
    loss = slice_distance_loss(good, z, half)
    loss.backward()
    assert float(loss.detach()) > 0 and half.grad is not None and float(half.grad) < 0   # pushes the scale up
    assert float(slice_consistency_loss(good, good, z, scale)) == 0.0
    assert float(slice_consistency_loss(good, good + 0.01, z, scale)) > 0
    with pytest.raises(ValueError, match="n >= 2"):
        slice_distance_loss(good[:, :1], z[:, :1], scale)


def test_slice_set_shapes_heights_and_determinism():
    vol = _toy_scan()
    box = body_bbox_from_hu(vol)
    a = sample_slice_set(vol, (2.5, 1.0, 1.0), box, 6, 32, np.random.default_rng(3))
    b = sample_slice_set(vol, (2.5, 1.0, 1.0), box, 6, 32, np.random.default_rng(3))
    assert a["image"].shape == (2, 6, 1, 32, 32) and a["image"].dtype == np.float32
    assert np.all(np.diff(a["z_mm"]) > 0) and np.allclose(a["z_mm"] % 2.5, 0)
    assert not np.array_equal(a["image"][0], a["image"][1])                 # two crops / augmentations
    np.testing.assert_array_equal(a["image"], b["image"])


def test_model_file_roundtrip_and_coordinate_map(tmp_path):
    torch.manual_seed(0)
    model = BodyPartRegressor(channels=(8, 16), slice_size=16)
    assert model(torch.rand(5, 1, 16, 16)).shape == (5,)
    path = save_guide(tmp_path / "guide.pt", model, {"step": 3})
    loaded = load_guide(tmp_path)
    assert isinstance(loaded, BodyPartRegressor) and loaded.slice_size == 16
    assert guide_kind(path) == "bpr"                    # what pretraining tags, so comparisons name the guide
    vol = _toy_scan(12)
    box = ((1, 10), (4, 27), (4, 27))
    cmap = predict_coords(loaded, vol, body_bbox_zyx=box)
    assert cmap.shape == (3, 12, 32, 32) and cmap.dtype == np.float32
    assert np.all(cmap[0] == cmap[0][:, :1, :1])                           # one score per slice
    assert cmap[1, 0, 4, 0] == 0 and cmap[1, 0, 27, 0] == 1 and cmap[2, 0, 0, 27] == 1
    np.testing.assert_allclose(cmap, bpr_coords(model, vol, box), atol=1e-6)
    scale = guide_scale_mm(loaded, np.ones((12, 32, 32), bool), (2.0, 1.0, 1.0))
    np.testing.assert_allclose(scale, [1000.0, 31.0, 31.0], rtol=1e-5)     # z learned, y/x the body's mm
    assert path.is_file()


def test_short_training_makes_scores_rise_with_height():
    torch.manual_seed(0)
    vol = _toy_scan()
    box = body_bbox_from_hu(vol)
    model = BodyPartRegressor(channels=(8, 16), slice_size=16, init_axis_scale_mm=200.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(60):
        s = sample_slice_set(vol, (3.0, 1.0, 1.0), box, 6, 16, rng)
        batch = {"image": torch.from_numpy(s["image"][None]), "z_mm": torch.from_numpy(s["z_mm"][None])}
        loss, info = bpr_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(info) == {"loss", "distance_loss", "consistency_loss", "axis_scale_z_mm"}
    scores = predict_coords(model, vol, body_bbox_zyx=box)[0, :, 16, 16]
    assert monotonic_fraction(scores) > 0.8


def test_partial_views_narrow_the_training_crops_to_parts_of_the_body():
    """``min_view_fraction`` < 1: half the crops per axis show only a part of the body (fields of view that cut
    it), so a slice's score learns not to depend on how much of the body is in view; 1 keeps the old crops."""
    from pipeline.guide.bpr import _jittered_box

    box = ((0.0, 100.0), (0.0, 100.0))
    widths = lambda f: np.array([[hi - lo for lo, hi in _jittered_box(box, rng, min_view_fraction=f)]  # noqa: E731
                                 for _ in range(400)])
    rng = np.random.default_rng(0)
    full = widths(1.0)
    rng = np.random.default_rng(0)
    part = widths(0.4)
    assert full.min() >= 70 - 1e-9 and full.max() <= 110 + 1e-9                # the old jitter: 0.7-1.1 x
    assert part.min() < 0.5 * 70 and (part < 70).mean() > 0.3                   # parts of the body
    assert part.max() <= 110 + 1e-9
    with pytest.raises(ValueError, match="bpr_min_view_fraction"):
        from pipeline.config import GuideConfig
        GuideConfig(data="x", bpr_min_view_fraction=0)
