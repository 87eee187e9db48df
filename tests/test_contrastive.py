"""The contrastive baseline (vox2vec): positives are the same physical voxel, InfoNCE golden values, the
feature pyramid read at the right cells, training lowers the loss, and the export is a plain backbone."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.baselines.contrastive import (ContrastiveModel, add_view_pairs, info_nce, overlapping_start,
                                            positive_voxels, select_voxel_features)
from pipeline.config import PretrainConfig, UserError, load_config
from pipeline.data.patches import PatchStream, cut_patch, load_volume_refs
from pipeline.train.checkpoint import load_pretrained, save_model, save_state
from pipeline.train.step import (add_objective_inputs, batch_to_tensors, build_model, build_training_model,
                                 make_ema, train_step)

SHAPE = (20, 36, 36)


def coded_corpus(root, n=2):
    """Volumes whose HU value names the voxel (unique within a volume), a body box as mask."""
    (root / "volumes").mkdir(parents=True)
    (root / "masks").mkdir()
    code = (np.arange(np.prod(SHAPE)) - 12000).reshape(SHAPE).astype(np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:17, 6:30, 8:28] = 1
    rows = []
    for i in range(n):
        np.save(root / "volumes" / f"v{i}.npy", code)
        np.save(root / "masks" / f"v{i}.npy", mask)
        rows.append({"item_id": f"v{i}", "status": "accepted", "image_path": f"volumes/v{i}.npy",
                     "mask_path": f"masks/v{i}.npy", "label_path": None, "shape": list(SHAPE),
                     "scanner_key": "A", "patient_key": None, "target_spacing_mm": [3.0, 3.0, 3.0],
                     "origin_xyz_mm": [0.0, 0.0, 0.0]})
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    return root


def tiny_cfg(**over) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "data": "unused", "objective": "contrastive", "patches": {"patch_size_zyx": [8, 16, 16]},
        "model": {"channels": [8, 16], "time_embed_dim": 16},
        "contrastive": {"voxels_per_view": 32, "proj_dim": 16},
        "optim": {"steps": 100, "warmup_steps": 1, "lr": 3e-3}} | over)


# ------------------------------------------------------------------------------------------------ loss
def test_info_nce_golden_orthonormal():
    e = torch.eye(2)
    # each row: positive logit 1, negatives 0 (other voxel of the same view) and 0 (other voxel of view 2)
    assert float(info_nce(e, e, 1.0)) == pytest.approx(math.log(2 + math.e) - 1, abs=1e-6)


def test_info_nce_golden_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    tau = 0.5
    dot = lambda u, v: float(u @ v) / tau  # noqa: E731
    loss1 = np.mean([math.log(math.exp(dot(a[i], a[1 - i])) + sum(math.exp(dot(a[i], b[j])) for j in range(2)))
                     - dot(a[i], b[i]) for i in range(2)])
    loss2 = np.mean([math.log(math.exp(dot(b[i], b[1 - i])) + sum(math.exp(dot(b[i], a[j])) for j in range(2)))
                     - dot(a[i], b[i]) for i in range(2)])
    assert float(info_nce(a, b, tau)) == pytest.approx((loss1 + loss2) / 2, abs=1e-6)
    # by hand: logits a.a' 1.2, a0.b 1.6 / 0, a1.b 1.92 / 1.6, b.b' 1.2; each of the four rows gives
    # log(e^1.2 + e^1.6 + 1) - 1.6 = 0.62712 or log(e^1.2 + e^1.92 + e^1.6) - 1.6 = 1.11431
    assert float(info_nce(a, b, tau)) == pytest.approx((0.627117 + 1.114307) / 2, abs=1e-5)


def test_info_nce_prefers_matched_pairs():
    e = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    matched, shuffled = info_nce(e, e, 0.1), info_nce(e, e.roll(1, dims=0), 0.1)
    assert float(matched) < 0.1 < float(shuffled)


# ------------------------------------------------------------------------------------------------ views
@pytest.mark.parametrize("seed", range(5))
def test_positive_pairs_are_the_same_physical_voxel(tmp_path, seed):
    refs = load_volume_refs(coded_corpus(tmp_path))
    rng = np.random.default_rng(seed)
    size = (8, 16, 16)
    start1 = np.array([rng.integers(-4, 16), rng.integers(-8, 24), rng.integers(-8, 24)])
    start2 = overlapping_start(start1, size, 0.5, rng)
    assert (np.abs(start2 - start1) <= np.array([4, 8, 8])).all()
    body1 = cut_patch(refs[0].mask(), start1, size, 0) > 0
    voxels = positive_voxels(body1, start1, start2, SHAPE, 24, rng)
    if voxels is None:  # too little shared volume for 24 pairs: it says so instead of repeating voxels
        return
    v1, v2 = voxels
    np.testing.assert_array_equal(start1 + v1, start2 + v2)
    raw1 = cut_patch(refs[0].image(), start1, size, -32768)
    raw2 = cut_patch(refs[0].image(), start2, size, -32768)
    seen1, seen2 = raw1[tuple(v1.T)], raw2[tuple(v2.T)]
    np.testing.assert_array_equal(seen1, seen2)
    assert (seen1 > -32768).all()  # inside the volume, never padding
    assert len(np.unique(seen1)) == 24  # no voxel twice
    grid = np.indices(size).reshape(3, -1).T
    in_view2 = ((grid + start1 - start2 >= 0) & (grid + start1 - start2 < size)).all(axis=1)
    shared = in_view2.reshape(size) & (raw1 > -32768)
    if (body1 & shared).sum() >= 24:
        assert body1[tuple(v1.T)].all()  # body voxels first
    else:
        assert body1[tuple(v1.T)].sum() == (body1 & shared).sum()


def test_add_view_pairs_and_objective_inputs(tmp_path):
    refs = load_volume_refs(coded_corpus(tmp_path))
    cfg = tiny_cfg()
    raw = PatchStream(refs, cfg.patches.patch_size_zyx, cfg.patches.window_hu).batch(3, 4)
    batch = add_objective_inputs(raw, cfg, rank=0, step=3, refs=refs)
    again = add_objective_inputs(raw, cfg, rank=0, step=3, refs=refs)
    other = add_objective_inputs(raw, cfg, rank=1, step=3, refs=refs)
    assert batch["image2"].shape == batch["image"].shape == (4, 1, 8, 16, 16)
    assert batch["coords2"].shape == (4, 3, 8, 16, 16) and batch["voxels"].shape == (4, 2, 32, 3)
    for key in ("image", "image2", "voxels"):
        np.testing.assert_array_equal(batch[key], again[key])  # seeded by (seed, rank, step)
    assert not np.array_equal(batch["voxels"], other["voxels"])
    np.testing.assert_array_equal(batch["start"][:, None] + batch["voxels"][:, 0],
                                  batch["start2"][:, None] + batch["voxels"][:, 1])
    for b in range(4):
        image = refs[raw["volume_index"][b]].image()
        v1, v2 = batch["voxels"][b]
        np.testing.assert_array_equal(cut_patch(image, batch["start"][b], (8, 16, 16), 0)[tuple(v1.T)],
                                      cut_patch(image, batch["start2"][b], (8, 16, 16), 0)[tuple(v2.T)])
    assert 0 <= batch["image2"].min() and batch["image2"].max() <= 1
    with pytest.raises(ValueError, match="refs"):
        add_objective_inputs(raw, cfg, rank=0, step=3)
    with pytest.raises(ValueError, match="volume_index"):
        add_view_pairs({k: v for k, v in raw.items() if k != "volume_index"}, refs, (-1000, 1000), 8, 0.5,
                       np.random.default_rng(0))


def test_too_many_voxels_per_view_is_a_config_error():
    with pytest.raises(UserError, match="contrastive.voxels_per_view must be at most 256"):
        load_config(PretrainConfig, None, {"data": "d", "objective": "contrastive",
                                           "patches": {"patch_size_zyx": [8, 16, 16]},
                                           "contrastive": {"voxels_per_view": 257}})
    load_config(PretrainConfig, None, {"data": "d", "objective": "diffusion",  # only checked when used
                                       "patches": {"patch_size_zyx": [8, 16, 16]},
                                       "contrastive": {"voxels_per_view": 257}})


def test_a_volume_too_small_for_the_pairs_is_a_clear_error(tmp_path):
    refs = load_volume_refs(coded_corpus(tmp_path))
    cfg = tiny_cfg(patches={"patch_size_zyx": [64, 128, 128]}, contrastive={"voxels_per_view": 30000})
    raw = PatchStream(refs, cfg.patches.patch_size_zyx, cfg.patches.window_hu).batch(0, 1)
    with pytest.raises(ValueError, match="lower contrastive.voxels_per_view"):
        add_objective_inputs(raw, cfg, rank=0, step=0, refs=refs)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("channels_last", [False, True])
def test_select_voxel_features_reads_the_cell_of_each_scale(channels_last):
    fine = torch.arange(2 * 3 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8, 8)
    coarse = -torch.arange(2 * 5 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 5, 4, 4, 4)
    if channels_last:
        fine, coarse = (f.to(memory_format=torch.channels_last_3d) for f in (fine, coarse))
    voxels = torch.tensor([[[0, 0, 0], [7, 5, 3]], [[1, 2, 3], [6, 6, 6]]])
    out = select_voxel_features([coarse, fine], (2, 1), voxels)
    assert out.shape == (2, 2, 5 + 3)
    for b in range(2):
        for k in range(2):
            z, y, x = voxels[b, k].tolist()
            torch.testing.assert_close(out[b, k, :5], coarse[b, :, z // 2, y // 2, x // 2])
            torch.testing.assert_close(out[b, k, 5:], fine[b, :, z, y, x])


def test_contrastive_training_lowers_the_loss_and_exports_a_plain_backbone(tmp_path):
    refs = load_volume_refs(coded_corpus(tmp_path / "data"))
    cfg = tiny_cfg(model={"channels": [8, 16], "time_embed_dim": 16, "guidance": "none"})
    torch.manual_seed(0)
    model = build_training_model(cfg)
    assert isinstance(model, ContrastiveModel)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    stream = PatchStream(refs, cfg.patches.patch_size_zyx, cfg.patches.window_hu)
    batch = batch_to_tensors(add_objective_inputs(stream.batch(0, 2), cfg, 0, 0, refs), torch.device("cpu"))
    losses = [train_step(model, opt, batch, cfg, None, step).loss for step in range(25)]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert all(p.grad is not None for p in model.parameters())  # DDP needs a gradient for every parameter
    save_model(tmp_path / "model.pt", make_ema(model), cfg, step=25)
    backbone, loaded_cfg = load_pretrained(tmp_path / "model.pt")
    assert loaded_cfg.objective == "contrastive"
    assert set(backbone.state_dict()) == set(build_model(cfg.model).state_dict())
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, model.backbone.state_dict()[key])
    save_state(tmp_path / "state", model, make_ema(model), opt, 25, cfg)  # resume keeps the head
    state = torch.load(tmp_path / "state" / "state.pt", weights_only=False)
    assert any(k.startswith("head.") for k in state["model"])


def test_contrastive_step_under_ddp(tmp_path):
    """One DDP (gloo, world size 1) step: the unused output layer must not trip DDP's reducer."""
    import os
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    refs = load_volume_refs(coded_corpus(tmp_path))
    cfg = tiny_cfg()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ddp = DistributedDataParallel(build_training_model(cfg))
        opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.optim.lr)
        stream = PatchStream(refs, cfg.patches.patch_size_zyx, cfg.patches.window_hu)
        for step in range(2):
            batch = batch_to_tensors(add_objective_inputs(stream.batch(step, 2), cfg, 0, step, refs),
                                     torch.device("cpu"))
            assert np.isfinite(train_step(ddp, opt, batch, cfg, None, step).loss)
    finally:
        dist.destroy_process_group()
