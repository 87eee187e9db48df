"""The pretraining step without Ray: loss, optimizer update, EMA, LR schedule, checkpoint round trip."""

import numpy as np
import pytest
import torch

from conftest import write_tiny_corpus
from pipeline.config import PretrainConfig
from pipeline.data.patches import PatchStream, load_volume_refs
from pipeline.diffusion.schedules import DiffusionSchedule
from pipeline.train.checkpoint import load_pretrained, load_state, save_state
from pipeline.data.conditioning import cond_channels
from pipeline.train.step import (batch_to_tensors, build_model, ema_decay_at, ema_update, lr_at, make_ema,
                                 train_step)


def tiny_cfg(**model) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "data": "unused", "patches": {"patch_size_zyx": [8, 16, 16]},
        "model": {"channels": [8, 16], "time_embed_dim": 16, **model},
        "optim": {"steps": 100, "warmup_steps": 10, "lr": 1e-3, "ema_decay": 0.9}})


def test_lr_schedule_golden():
    optim = tiny_cfg().optim
    assert lr_at(0, optim) == pytest.approx(1e-4)
    assert lr_at(9, optim) == pytest.approx(1e-3)
    assert lr_at(10, optim) == pytest.approx(1e-3)
    assert lr_at(100, optim) == pytest.approx(1e-4)
    assert lr_at(55, optim) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))


def test_ema_warmup_golden():
    """diffusers' EMAModel warm-up: (1 + step) / (10 + step), capped at the configured decay."""
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(100_000, 0.999) == 0.999
    # after 150 warm-up updates of 0.99 the initial weights keep a negligible share (0.99^150 = 22 % without)
    share = np.prod([ema_decay_at(s, 0.99) for s in range(150)])
    assert share < 1e-6


@pytest.mark.parametrize("guidance,encoding,channels", [("none", "sincos", 0), ("bodybox", "raw", 3),
                                                         ("bodybox", "sincos", 24)])
def test_guidance_channels(guidance, encoding, channels):
    cfg = tiny_cfg(guidance=guidance, guidance_encoding=encoding)
    assert cond_channels(cfg.model) == channels


@pytest.mark.parametrize("injection", ["concat", "film"])
def test_train_step_updates_and_ema(tmp_path, injection):
    cfg = tiny_cfg(guidance_injection=injection)
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ema = make_ema(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    schedule = DiffusionSchedule.from_config(cfg.diffusion)
    stream = PatchStream(refs, cfg.patches.patch_size_zyx, cfg.patches.window_hu)
    res = train_step(model, opt, batch_to_tensors(stream.batch(0, 2), torch.device("cpu")), cfg, schedule, 0)
    assert np.isfinite(res.loss) and res.loss > 0 and res.grad_norm > 0
    assert res.lr == pytest.approx(1e-4)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert moved > len(before) // 2
    ema_update(ema, model, 0.9)
    p_model, p_ema, p_before = next(model.parameters()), next(ema.parameters()), before[0]
    torch.testing.assert_close(p_ema, 0.9 * p_before + 0.1 * p_model.detach())


def test_diffusion_training_lowers_loss(tmp_path):
    """A few dozen steps on a fixed batch must lower the denoising loss (the pipe is wired right)."""
    cfg = tiny_cfg()
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = DiffusionSchedule.from_config(cfg.diffusion)
    batch = batch_to_tensors(PatchStream(refs, (8, 16, 16), (-1000, 1000)).batch(0, 4), torch.device("cpu"))
    cfg.optim.warmup_steps = 0
    cfg.optim.lr = 3e-3
    losses = []
    for step in range(40):
        torch.manual_seed(step % 4)  # the same 4 (t, noise) draws over and over
        losses.append(train_step(model, opt, batch, cfg, schedule, 0).loss)
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters())
    save_state(tmp_path, model, ema, opt, 7, cfg)
    assert load_state(tmp_path)["step"] == 7
    loaded, loaded_cfg = load_pretrained(tmp_path)
    assert loaded_cfg == cfg
    x = torch.randn(1, 1, 8, 16, 16)
    c = torch.rand(1, 3, 8, 16, 16)
    from pipeline.data.conditioning import guidance_cond
    t = torch.tensor([5])
    torch.testing.assert_close(loaded(x, t, guidance_cond(cfg.model, c)), ema(x, t, guidance_cond(cfg.model, c)))
    rnd, _ = load_pretrained(tmp_path, random_init=True, seed=1)
    assert not torch.equal(next(rnd.parameters()), next(ema.parameters()))


def test_restorative_step_reconstructs(tmp_path):
    from pipeline.train.step import add_objective_inputs

    cfg = tiny_cfg()
    cfg.objective = "restorative"
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    raw = PatchStream(refs, (8, 16, 16), (-1000, 1000)).batch(0, 2)
    batch = add_objective_inputs(raw, cfg, rank=0, step=0)
    again = add_objective_inputs(raw, cfg, rank=0, step=0)
    np.testing.assert_array_equal(batch["corrupted"], again["corrupted"])  # resumable
    assert batch["corrupted"].shape == raw["image"].shape and not np.array_equal(batch["corrupted"], raw["image"])
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    res = train_step(model, opt, batch_to_tensors(batch, torch.device("cpu")), cfg, None, 0)
    assert np.isfinite(res.loss) and res.loss > 0


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 2 give the same update as one batch of 4 (same t and noise per sample)."""
    from pipeline.train.step import compute_loss

    cfg = tiny_cfg()
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    big = batch_to_tensors(PatchStream(refs, (8, 16, 16), (-1000, 1000)).batch(0, 4), torch.device("cpu"))
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    schedule = DiffusionSchedule.from_config(cfg.diffusion)
    grads = []
    for batches in (big, halves):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(1)
        if isinstance(batches, list):  # draw (t, noise) for the 4 samples exactly as the big batch does
            import pipeline.train.step as step_mod
            t = torch.randint(0, 1000, (4,))
            noise = torch.randn(big["image"].shape)
            calls = iter([(t[:2], noise[:2]), (t[2:], noise[2:])])
        else:
            t = torch.randint(0, 1000, (4,))
            noise = torch.randn(big["image"].shape)
            calls = iter([(t, noise)])
        import pipeline.diffusion.objective as obj
        orig = obj.diffusion_loss

        def fixed(model_fn, x0, schedule, prediction="epsilon", **kw):
            tt, nn_ = next(calls)
            return orig(model_fn, x0, schedule, prediction, t=tt, noise=nn_)

        import pipeline.train.step as step_mod
        step_mod.diffusion_loss = fixed
        try:
            train_step(model, opt, batches, cfg, schedule, 0)
        finally:
            step_mod.diffusion_loss = orig
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_denoise_preview_png(tmp_path):
    from pipeline.train.preview import denoise_preview, save_preview_png

    cfg = tiny_cfg()
    refs = load_volume_refs(write_tiny_corpus(tmp_path / "c"))
    batch = batch_to_tensors(PatchStream(refs, (8, 16, 16), (-1000, 1000)).batch(0, 2), torch.device("cpu"))
    model = build_model(cfg.model).eval()
    slices = denoise_preview(model, batch, cfg, DiffusionSchedule.from_config(cfg.diffusion), steps=5)
    assert set(slices) == {"clean", "noisy", "denoised"} and slices["clean"].shape == (16, 16)
    np.testing.assert_allclose(slices["clean"], batch["image"][0, 0, 4].numpy(), atol=1e-6)
    png = save_preview_png(slices, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_ddp_model_trains_and_checkpoints_like_the_bare_one(tmp_path, monkeypatch):
    """What a `compile: true` worker does (pretrain-gpu): torch.compile(DDP(model)); the step, EMA and the
    checkpoint see the bare module (no '_orig_mod.' / 'module.' prefixes). backend='eager' keeps this fast:
    the wrappers are what is tested here, not the code generation."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.benchmarks.gpu import _free_port
    from pipeline.models.weights import unwrap

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = tiny_cfg()
        torch.manual_seed(0)
        model = build_model(cfg.model)
        ema = make_ema(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        compiled = torch.compile(DistributedDataParallel(model), backend="eager")
        assert unwrap(compiled) is model
        schedule = DiffusionSchedule.from_config(cfg.diffusion)
        batch = {"image": torch.rand(2, 1, 8, 16, 16), "coords": torch.rand(2, 3, 8, 16, 16)}
        before = [p.detach().clone() for p in model.parameters()]
        result = train_step(compiled, opt, batch, cfg, schedule, 20)
        ema_update(ema, unwrap(compiled), cfg.optim.ema_decay)
        assert np.isfinite(result.loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        save_state(tmp_path, compiled, ema, opt, 1, cfg)
        state = load_state(tmp_path)
        assert set(state["model"]) == set(build_model(cfg.model).state_dict())
        load_pretrained(tmp_path)  # loads into a bare model without key errors
    finally:
        dist.destroy_process_group()
