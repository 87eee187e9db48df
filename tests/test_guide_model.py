"""Coordinate guide network, its training step, whole-volume inference and the guide.pt format."""

import numpy as np
import pytest
import torch

from pipeline.config import UserError
from pipeline.data.inputs import scale_hu
from pipeline.guide.crops import crop_positions_mm, sample_crop_pair
from pipeline.guide.inference import guide_kind, load_guide, load_guide_meta, predict_coords, save_guide
from pipeline.guide.model import GUIDE_WINDOW_HU, CoordinateGuide, sample_coords
from pipeline.guide.train import (collate_pairs, guide_loss, guide_param_groups, guide_train_step,
                                  sample_overlap_indices, sample_voxel_indices)

SPACING = (3.0, 2.0, 2.0)


def _tiny_guide(seed=0):
    torch.manual_seed(seed)
    return CoordinateGuide(channels=(8, 16), stride=4)          # size_multiple 8


def _volume(seed=0, shape=(24, 40, 40)):
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, np.int16)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (shape[1] / 3) ** 2
    vol[body] = (40 + 30 * np.sin(z[body] / 3.0)).astype(np.int16)   # anatomy varying along z
    vol[body & (z % 8 < 2)] = 700                                    # "vertebrae"
    vol += rng.normal(0, 10, shape).astype(np.int16)
    return vol, body.astype(np.uint8)


def _batch(n_pairs=2, size=(16, 16, 16), seed=0):
    vol, mask = _volume()
    rng = np.random.default_rng(seed)
    return collate_pairs([sample_crop_pair(vol, SPACING, size, rng, mask_zyx=mask) for _ in range(n_pairs)])


def test_forward_shapes_range_and_axis_scale():
    model = _tiny_guide()
    x = torch.rand(2, 1, 16, 24, 32)
    out = model(x)
    assert out.shape == (2, 3, 4, 6, 8) and out.min() >= 0 and out.max() <= 1
    assert model.forward_full(x).shape == (2, 3, 16, 24, 32)
    np.testing.assert_allclose(model.axis_scale_mm.detach().numpy(), [1000, 1000, 1000], rtol=1e-6)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        CoordinateGuide(channels=(8, 12))


def test_sample_coords_matches_forward_full_at_voxels():
    model = _tiny_guide()
    x = torch.rand(2, 1, 16, 16, 24)
    maps, full = model(x), model.forward_full(x)
    idx = torch.tensor([[[0, 0, 0], [15, 15, 23], [5, 9, 13]], [[7, 2, 20], [1, 14, 3], [8, 8, 8]]])
    got = sample_coords(maps, idx.float(), model.stride)
    want = torch.stack([full[b, :, i[:, 0], i[:, 1], i[:, 2]].T for b, i in enumerate(idx)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sampled_points_have_consistent_physical_positions():
    batch = _batch()
    origin, spacing = batch["origin_zyx_mm"].numpy(), batch["spacing_zyx_mm"].numpy()
    ov = sample_overlap_indices(origin[0], spacing[0], (16, 16, 16), 50, np.random.default_rng(0))
    pos0 = crop_positions_mm(origin[0, 0], spacing[0, 0], ov[0])
    pos1 = crop_positions_mm(origin[0, 1], spacing[0, 1], ov[1])
    np.testing.assert_allclose(pos0, pos1, atol=1e-9)            # the same physical point in both crops
    assert np.all((ov >= -1e-9) & (ov <= 15 + 1e-9))
    body = np.zeros((4, 4, 4), bool)
    body[0, 0, :2] = True
    idx = sample_voxel_indices(body, 10, np.random.default_rng(1), body_fraction=0.5)
    assert body[tuple(idx.T)].sum() == 5


def test_guide_loss_reaches_every_parameter():
    model = _tiny_guide()
    loss, info = guide_loss(model, _batch(), n_points=32, rng=np.random.default_rng(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []                                          # DDP needs no find_unused_parameters
    assert info["loss"] == pytest.approx(info["distance_loss"] + info["consistency_loss"], rel=1e-6)
    assert set(info) >= {"axis_scale_z_mm", "axis_scale_y_mm", "axis_scale_x_mm"}


def test_train_steps_reduce_the_loss_on_a_fixed_batch():
    model = _tiny_guide()
    batch = _batch()
    opt = torch.optim.AdamW(guide_param_groups(model, 1e-4), lr=3e-3)
    losses = [guide_train_step(model, opt, batch, 32, np.random.default_rng(0))["loss"] for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_param_groups_do_not_decay_the_axis_scale():
    model = _tiny_guide()
    groups = guide_param_groups(model, 0.1)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0][0]["params"]
    assert any(p is model.log_axis_scale_mm for p in no_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_predict_coords_whole_and_sliding():
    model = _tiny_guide()
    vol, _ = _volume(shape=(16, 24, 24))
    out = predict_coords(model, vol)
    assert out.shape == (3, 16, 24, 24) and out.dtype == np.float32
    x = torch.from_numpy(scale_hu(vol, GUIDE_WINDOW_HU))[None, None]
    with torch.no_grad():
        np.testing.assert_allclose(out, model.forward_full(x)[0].numpy(), atol=1e-6)
    odd = predict_coords(model, vol[:13, :21, :19])               # padded, then cropped back
    assert odd.shape == (3, 13, 21, 19) and odd.min() >= 0 and odd.max() <= 1
    slid = predict_coords(model, vol, window_zyx=(16, 16, 16))
    assert slid.shape == (3, 16, 24, 24) and np.isfinite(slid).all()
    with pytest.raises(ValueError, match="window_zyx"):
        predict_coords(model, vol, window_zyx=(12, 16, 16))


def test_save_load_roundtrip(tmp_path):
    model = _tiny_guide()
    with torch.no_grad():
        model.log_axis_scale_mm.copy_(torch.tensor([6.0, 5.5, 5.0]))
    path = save_guide(tmp_path / "guide.pt", model, {"step": 7})
    loaded = load_guide(tmp_path)                                  # a folder holding guide.pt works too
    assert guide_kind(tmp_path) == "coords"
    x = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    torch.testing.assert_close(loaded.axis_scale_mm, model.axis_scale_mm)
    assert load_guide_meta(path) == {"step": 7}
    torch.save({"format": "anatdiff.model/1"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a guide checkpoint"):
        load_guide(tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_guide(tmp_path / "missing.pt")


def test_collate_pairs_shapes_and_errors():
    batch = _batch(n_pairs=3, size=(8, 16, 16))
    assert batch["image"].shape == (3, 2, 1, 8, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["body"].shape == (3, 2, 8, 16, 16) and batch["body"].dtype == torch.bool
    assert batch["origin_zyx_mm"].shape == (3, 2, 3)
    with pytest.raises(ValueError, match="no crop pairs"):
        collate_pairs([])
    with pytest.raises(ValueError, match="lack"):
        collate_pairs([{"image": np.zeros(1)}])


def test_padding_mode_hides_crop_borders_and_round_trips(tmp_path):
    """Replicate padding (the default) survives save/load; zeros stays available as an option."""
    from pipeline.guide.inference import load_guide, save_guide
    from pipeline.guide.model import CoordinateGuide

    guide = CoordinateGuide(channels=(8, 16))
    padded = [m for m in guide.modules() if isinstance(m, torch.nn.Conv3d) and any(p > 0 for p in m.padding)]
    assert padded and all(m.padding_mode == "replicate" for m in padded)
    loaded = load_guide(save_guide(tmp_path / "guide.pt", guide))
    assert loaded.config()["padding_mode"] == "replicate"
    assert CoordinateGuide(channels=(8, 16), padding_mode="zeros").config()["padding_mode"] == "zeros"
    with pytest.raises(ValueError, match="padding_mode"):
        CoordinateGuide(channels=(8, 16), padding_mode="circular-ish")
