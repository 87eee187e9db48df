"""The voxel feature bank of frozen heads: exact upsampling at sampled voxels, per-voxel heads equal the map
heads, window voxel sampling, bank determinism, and the online probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PretrainConfig, ProbeConfig
from pipeline.evaluation.features import (BackboneFeatures, BankSpec, build_bank, gather_upsampled,
                                         sample_window_voxels)
from pipeline.evaluation.heads import build_head
from tests.conftest import write_tiny_corpus


def test_gather_upsampled_equals_interpolate_then_index():
    g = torch.Generator().manual_seed(0)
    size = (8, 12, 16)
    feats = [torch.randn(1, 3, 2, 3, 4, generator=g), torch.randn(1, 2, 4, 6, 8, generator=g),
             torch.randn(1, 1, 8, 12, 16, generator=g)]
    points = torch.stack([torch.randint(0, n, (50,), generator=g) for n in size], dim=1)
    points = torch.cat([points, torch.tensor([[0, 0, 0], [7, 11, 15]])])   # both corners (clamped borders)
    full = torch.cat([F.interpolate(f, size=size, mode="trilinear", align_corners=False) for f in feats], 1)[0]
    expect = full[:, points[:, 0], points[:, 1], points[:, 2]].T
    torch.testing.assert_close(gather_upsampled(feats, size, points), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_head_on_voxel_vectors_equals_head_on_maps(kind):
    torch.manual_seed(0)
    channels, strides, size = (6, 4, 3), (4, 2, 1), (8, 8, 4)
    head = build_head(kind, channels, hidden=8, feature_strides=strides)
    head.fuse.set_input_stats(torch.randn(13), torch.rand(13) + 0.5)
    feats = [torch.randn(1, c, *(n // s for n in size)) for c, s in zip(channels, strides)]
    maps = head(feats, size)[0]
    points = torch.tensor([[0, 0, 0], [3, 5, 1], [7, 7, 3], [4, 2, 2]])
    vectors = gather_upsampled(feats, size, points)
    torch.testing.assert_close(head.forward_voxels(vectors), maps[:, points[:, 0], points[:, 1], points[:, 2]].T,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="feature vectors"):
        head.forward_voxels(vectors[:, :5])


def test_window_voxels_cover_the_body_mixture_and_every_organ():
    label = np.zeros((10, 10, 10), np.uint8)
    mask = np.zeros_like(label, bool)
    mask[1:9, 1:9, 1:9] = True
    label[2:7, 2:7, 2:7] = 6       # 125 voxels
    label[8, 8, 8] = 12            # one voxel
    rng = np.random.default_rng(0)
    flat = sample_window_voxels(label, mask, n_uniform=40, n_per_organ=5, rng=rng)
    values = label.reshape(-1)[flat]
    assert len(flat) == 40 + 5 + 1                        # uniform + 5 liver + the single adrenal voxel
    assert (values == 12).sum() >= 1 and (values == 6).sum() >= 5
    assert mask.reshape(-1)[flat[:40]].all()              # the uniform part lies in the body
    assert len(sample_window_voxels(label, np.zeros_like(mask), 40, 0, rng)) == 0


def _tiny_backbone(tmp_path):
    from pipeline.train.checkpoint import load_pretrained, save_model
    from pipeline.train.step import build_model

    cfg = PretrainConfig(data=str(tmp_path), model={"channels": (8, 16), "time_embed_dim": 16, "stem_stride": 2},
                         patches={"patch_size_zyx": (8, 8, 8)})
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_model(cfg.model), cfg, step=0)
    return load_pretrained(tmp_path / "model.pt")


def test_bank_is_deterministic_per_volume_and_cached(tmp_path):
    from pipeline.data.patches import load_volume_refs

    data = write_tiny_corpus(tmp_path / "data", n=2)
    refs = load_volume_refs(data, require_labels=True)
    backbone, pcfg = _tiny_backbone(tmp_path)
    feats = BackboneFeatures(backbone, pcfg, (0, 50))
    spec = BankSpec((8, 8, 8), (-1000, 1000), windows_per_volume=3, voxels_uniform=20, voxels_per_organ=4,
                    foreground_prob=0.67, jitter=0.25, seed=5)
    a = build_bank(feats, refs, spec)
    assert a.features.shape[1] == sum(feats.feature_channels) == 2 * (16 + 8 + 8)
    assert a.features.dtype == torch.float16 and len(a) == len(a.labels) > 0
    assert (a.labels > 0).any() and (a.labels == 0).any()
    # a volume's rows do not depend on the other volumes of the fold (folds share them)
    alone = build_bank(feats, refs[1:], spec)
    assert torch.equal(a.features[-len(alone):], alone.features)
    # nor on the id preprocessing gave it (keyed ids are new on every run): the same windows under another id
    renamed = load_volume_refs(data, require_labels=True)[1:]
    renamed[0].item_id = "ct-0123456789abcdef"
    assert torch.equal(build_bank(feats, renamed, spec).features, alone.features)
    cached = build_bank(feats, refs, spec, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*/*.npz"))
    assert len(files) == 2 and torch.equal(cached.features, a.features)
    files[0].write_bytes(b"")                                              # the cache is what is read back
    with pytest.raises(Exception):
        build_bank(feats, refs, spec, cache_dir=tmp_path / "cache")
    (tmp_path / "other").mkdir()
    other = BackboneFeatures(_tiny_backbone(tmp_path / "other")[0], pcfg, (0, 50))
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1.0)                       # other weights: another key
    build_bank(other, refs, spec, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    mean, std = a.channel_stats()
    assert mean.shape == std.shape == (a.features.shape[1],)


def test_full_disk_turns_the_bank_cache_off_instead_of_failing(tmp_path, monkeypatch):
    import errno

    import pipeline.evaluation.features as features_mod
    from pipeline.data.patches import load_volume_refs

    refs = load_volume_refs(write_tiny_corpus(tmp_path / "data", n=2), require_labels=True)
    backbone, pcfg = _tiny_backbone(tmp_path)
    feats = BackboneFeatures(backbone, pcfg, (0,))
    spec = BankSpec((8, 8, 8), (-1000, 1000), windows_per_volume=2, voxels_uniform=10, voxels_per_organ=2,
                    foreground_prob=0.67, jitter=0.25, seed=1)
    calls = []

    def full_disk(path, write):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features_mod, "write_atomic", full_disk)
    with pytest.warns(RuntimeWarning, match="no space left on device"):
        bank = build_bank(feats, refs, spec, cache_dir=tmp_path / "cache")
    assert len(calls) == 1                                                  # one try, then no more writes
    assert torch.equal(bank.features, build_bank(feats, refs, spec).features)
    assert not list((tmp_path / "cache").glob("*/*.npz"))

    def other_error(path, write):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(features_mod, "write_atomic", other_error)
    with pytest.raises(PermissionError):                                    # only a full disk is forgiven
        build_bank(feats, refs, spec, cache_dir=tmp_path / "cache2")


def test_bank_cache_bytes_bounds_what_the_cache_writes(tmp_path):
    """The study's disk check relies on it: the bank files on disk never exceed the estimate (every window with
    all 13 organs), and are at least the windows' uniform rows (a wrong dtype or layout breaks one side)."""
    from pipeline.data.patches import load_volume_refs
    from pipeline.evaluation.features import bank_cache_bytes

    refs = load_volume_refs(write_tiny_corpus(tmp_path / "data", n=2), require_labels=True)
    backbone, pcfg = _tiny_backbone(tmp_path)
    feats = BackboneFeatures(backbone, pcfg, (0,))
    spec = BankSpec((8, 8, 8), (-1000, 1000), windows_per_volume=3, voxels_uniform=20, voxels_per_organ=4,
                    foreground_prob=0.67, jitter=0.25, seed=1)
    build_bank(feats, refs, spec, cache_dir=tmp_path / "cache")
    written = sum(f.stat().st_size for f in (tmp_path / "cache").glob("*/*.npz"))
    channels = sum(feats.feature_channels)
    assert bank_cache_bytes(2, spec, channels, organs=0) - 2 * 1024 <= written <= bank_cache_bytes(2, spec, channels)


def test_online_probe_scores_features(tmp_path):
    from pipeline.data.patches import load_volume_refs
    from pipeline.evaluation.probe import probe_dice, split_probe_refs

    data = write_tiny_corpus(tmp_path / "data", n=3)
    backbone, pcfg = _tiny_backbone(tmp_path)
    cfg = ProbeConfig(data=str(data), fit_cases=2, score_cases=1, windows_per_volume=2, head_steps=5)
    fit, score = split_probe_refs(load_volume_refs(data, require_labels=True), cfg)
    assert len(fit) == 2 and len(score) == 1 and score[0] not in fit
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = probe_dice(backbone, pcfg, cfg, fit, score)
    assert 0.0 <= out["probe_dice_mean"] <= 1.0 and out["probe_seconds"] > 0
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())   # backbone untouched
    with pytest.raises(ValueError, match="fit_cases"):
        split_probe_refs(fit, cfg.model_copy(update={"fit_cases": 3}))
