"""`anatdiff benchmark gpu`: the GPU path of the real presets (bf16, nccl, channels-last), measured.

Needs one CUDA device; no Ray, no MLflow, no data: the inputs are random tensors (pretraining) and crop
pairs cut by the real crop code from a synthetic volume (guide), at the shapes of ``pretrain-gpu`` and
``guide-gpu``. The model is wrapped the way every Ray Train worker wraps it: a process group over nccl
(world size 1 here) and ``DistributedDataParallel``. Figures (last line JSON):

- ``pretrain_{bf16,fp32}_steps_per_s``, ``pretrain_bf16_speedup``, ``pretrain_samples_per_s``,
  ``pretrain_peak_gib``: the pretraining step (``pipeline.train.step.train_step``) in bf16 autocast vs fp32.
- ``pretrain_bf16_vs_fp32_loss_rel``: |loss bf16 - loss fp32| / loss fp32 on the same (fitted) weights, batch
  and noise.
- ``pretrain_loss_first`` / ``pretrain_loss_last``: mean loss of the first and last 10 of ``fit_steps`` steps
  on one fixed batch (the loss must fall: the step learns).
- ``guide_steps_per_s``, ``guide_peak_gib``, ``guide_loss_first`` / ``guide_loss_last``: the guide step.
- ``compile_steps_per_s``, ``compile_s`` (unless ``--quick``): ``torch.compile`` of the pretraining model.
- Efficiency (``pipeline.benchmarks.efficiency``): ``{pretrain,guide}_tflop_per_step`` (model FLOPs of one
  training step, forward + backward, counted by ``FlopCounterMode``), ``{pretrain,guide,compile}_achieved_tflops``
  and ``_mfu`` (achieved / the card's dense bf16 peak; ``_mfu_note`` instead for a card not in the table),
  ``{pretrain,guide}_largest_batch`` (doubling until out of memory, bf16), ``guide_crop_pairs_per_s_per_core``
  (crop pairs one CPU core cuts from a memory map) and ``guide_cores_to_feed`` (cores a GPU worker needs so
  that its crops keep up with the step).
``device="cpu"`` runs the same code on the tiny presets (gloo, no compile, batch search up to 4): a smoke run.
Progress lines start with ``#``.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import torch

from pipeline.benchmarks.efficiency import (count_flops, crop_pairs_per_s, largest_batch, mfu_figures,
                                            synthetic_volume)
from pipeline.config import GuideConfig, PretrainConfig, load_config

GIB = 2 ** 30


def _log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(model.parameters()).device.type == "cuda"
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _timed_steps(step_fn, steps: int, warmup: int, device: torch.device) -> tuple[float, list[float]]:
    losses = []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        losses.append(step_fn(i))
    _sync(device)
    return steps / (time.perf_counter() - t0), losses


def _pretrain_batch(cfg: PretrainConfig, device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, (d, h, w) = cfg.optim.batch_size, cfg.patches.patch_size_zyx
    image = torch.nn.functional.avg_pool3d(torch.rand(b, 1, d, h, w, generator=g), 5, 1, 2)  # smooth, [0, 1]
    ramps = [torch.linspace(0, 1, n).view(*[n if a == i else 1 for a in range(3)]) for i, n in enumerate((d, h, w))]
    coords = torch.stack([r.expand(d, h, w) for r in ramps])[None].expand(b, 3, d, h, w).contiguous()
    return {"image": image.to(device), "coords": coords.to(device)}


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _time_pretrain(cfg: PretrainConfig, batch: dict, schedule, dtype, steps: int,
                   device: torch.device) -> tuple[float, float]:
    """(steps/s, peak GiB) of the pretraining step + EMA update on a fresh DDP-wrapped, channels-last model."""
    from pipeline.train.step import build_model, ema_update, make_ema, train_step

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    ddp = _ddp(model)
    _reset_peak(device)

    def step(i: int) -> float:
        result = train_step(ddp, opt, batch, cfg, schedule, cfg.optim.warmup_steps + i, dtype)
        ema_update(ema, model, cfg.optim.ema_decay)
        return result.loss

    rate, _ = _timed_steps(step, steps, 3, device)
    return rate, _peak_gib(device)


def pretrain_figures(cfg: PretrainConfig, steps: int, fit_steps: int, device: torch.device) -> dict[str, float]:
    from pipeline.diffusion.schedules import DiffusionSchedule
    from pipeline.train.step import build_model, compute_loss, train_step

    schedule = DiffusionSchedule.from_config(cfg.diffusion).to(device)
    batch = _pretrain_batch(cfg, device)
    out: dict[str, float] = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        rate, peak = _time_pretrain(cfg, batch, schedule, dtype, steps, device)
        out[f"pretrain_{name}_steps_per_s"], out[f"pretrain_{name}_peak_gib"] = rate, peak
        _log(f"pretrain {name}: {rate:.2f} steps/s, peak {peak:.1f} GiB")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["pretrain_bf16_speedup"] = out["pretrain_bf16_steps_per_s"] / out["pretrain_fp32_steps_per_s"]
    out["pretrain_samples_per_s"] = out["pretrain_bf16_steps_per_s"] * cfg.optim.batch_size
    out["pretrain_peak_gib"] = out["pretrain_bf16_peak_gib"]

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    ddp = _ddp(model)
    fit = [train_step(ddp, opt, batch, cfg, schedule, cfg.optim.warmup_steps + i, torch.bfloat16).loss
           for i in range(fit_steps)]
    out["pretrain_loss_first"], out["pretrain_loss_last"] = float(np.mean(fit[:10])), float(np.mean(fit[-10:]))
    if not all(np.isfinite(fit)):
        raise RuntimeError(f"non-finite pretraining loss on the GPU: {fit}")
    # after the fit: at initialization the zero-initialized output layer makes both losses equal exactly
    losses = {}
    with torch.no_grad():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            torch.manual_seed(1)
            with _autocast(device, dtype):
                losses[name] = float(compute_loss(model, batch, cfg, schedule))
    out["pretrain_bf16_vs_fp32_loss_rel"] = abs(losses["bf16"] - losses["fp32"]) / max(losses["fp32"], 1e-12)
    _log(f"pretrain fit on one batch: loss {out['pretrain_loss_first']:.4f} -> {out['pretrain_loss_last']:.4f}")
    return out


def compile_figures(cfg: PretrainConfig, steps: int, device: torch.device) -> dict[str, float]:
    from pipeline.diffusion.schedules import DiffusionSchedule
    from pipeline.train.step import build_model, train_step

    schedule = DiffusionSchedule.from_config(cfg.diffusion).to(device)
    batch = _pretrain_batch(cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    compiled = torch.compile(_ddp(model))
    t0 = time.perf_counter()
    train_step(compiled, opt, batch, cfg, schedule, cfg.optim.warmup_steps, torch.bfloat16)
    _sync(device)
    compile_s = time.perf_counter() - t0
    rate, _ = _timed_steps(lambda i: train_step(compiled, opt, batch, cfg, schedule, cfg.optim.warmup_steps + i,
                                                torch.bfloat16).loss, steps, 2, device)
    _log(f"compile: {compile_s:.0f} s, then {rate:.2f} steps/s")
    return {"compile_s": compile_s, "compile_steps_per_s": rate}


def _guide_batches(cfg: GuideConfig, device: torch.device, n: int = 4) -> list[dict]:
    """``n`` collated batches of crop pairs cut by the real crop code from a synthetic volume."""
    from pipeline.guide.crops import sample_crop_pair
    from pipeline.guide.train import collate_pairs

    rng = np.random.default_rng(0)
    volume, mask = synthetic_volume(rng)
    batches = []
    for _ in range(n):
        pairs = [sample_crop_pair(volume, (2.0, 1.5, 1.5), cfg.crop_size_zyx, rng, mask_zyx=mask,
                                  scan_end_probability=cfg.scan_end_probability)
                 for _ in range(cfg.optim.batch_size)]
        batch = collate_pairs(pairs)
        batches.append({k: v.to(device) if k == "image" else v for k, v in batch.items()})
    return batches


def guide_figures(cfg: GuideConfig, steps: int, fit_steps: int, device: torch.device,
                  dtype=torch.bfloat16) -> dict[str, float]:
    from pipeline.guide.model import build_guide
    from pipeline.guide.train import guide_param_groups, guide_train_step

    batches = _guide_batches(cfg, device)
    torch.manual_seed(0)
    model = build_guide(cfg.model).to(device)
    opt = torch.optim.AdamW(guide_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    ddp = _ddp(model)
    _reset_peak(device)

    def step(i: int) -> float:
        info = guide_train_step(ddp, opt, batches[i % len(batches)], cfg.n_points, np.random.default_rng(i),
                                cfg.optim.grad_clip, cfg.consistency_weight, cfg.body_fraction, cfg.frame, dtype)
        return info["loss"]

    rate, _ = _timed_steps(step, steps, 3, device)
    fit = [step(i) for i in range(fit_steps)]
    if not all(np.isfinite(fit)):
        raise RuntimeError(f"non-finite guide loss on the GPU: {fit}")
    out = {"guide_steps_per_s": rate, "guide_pairs_per_s": rate * cfg.optim.batch_size,
           "guide_peak_gib": _peak_gib(device),
           "guide_loss_first": float(np.mean(fit[:10])), "guide_loss_last": float(np.mean(fit[-10:]))}
    _log(f"guide: {rate:.2f} steps/s, peak {out['guide_peak_gib']:.1f} GiB, "
         f"loss {out['guide_loss_first']:.4f} -> {out['guide_loss_last']:.4f}")
    return out


def _release(device: torch.device) -> None:
    """Free what a finished (or out-of-memory) trial left behind."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _with_batch(cfg, batch_size: int):
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"batch_size": batch_size})})


def pretrain_efficiency(cfg: PretrainConfig, device: torch.device, batch_limit: int) -> dict:
    """Model FLOPs of one pretraining step (forward + backward at the preset's batch; counted on the meta
    device) and the largest batch whose bf16 training steps fit in memory."""
    from pipeline.diffusion.schedules import DiffusionSchedule
    from pipeline.train.step import build_model, compute_loss, train_step

    meta = torch.device("meta")  # shapes only: the count costs no compute
    model, batch = build_model(cfg.model).to(meta), _pretrain_batch(cfg, meta)
    flops = count_flops(lambda: compute_loss(model, batch, cfg, DiffusionSchedule.from_config(cfg.diffusion).to(meta))
                        .backward())
    schedule = DiffusionSchedule.from_config(cfg.diffusion).to(device)

    def fits(batch_size: int) -> bool:
        trial = _with_batch(cfg, batch_size)
        net = build_model(trial.model).to(device)
        opt, data = torch.optim.AdamW(net.parameters(), lr=trial.optim.lr), _pretrain_batch(trial, device)
        for i in range(2):
            train_step(net, opt, data, trial, schedule, trial.optim.warmup_steps + i, torch.bfloat16)
        _sync(device)
        return True

    biggest = largest_batch(fits, limit=batch_limit)
    _release(device)
    _log(f"pretrain: {flops / 1e12:.3f} TFLOP per step, largest batch {biggest} (limit {batch_limit})")
    return {"pretrain_tflop_per_step": flops / 1e12, "pretrain_largest_batch": biggest}


def guide_efficiency(cfg: GuideConfig, device: torch.device, batch_limit: int, crop_seconds: float) -> dict:
    """Model FLOPs of one guide step, the largest batch of pairs that fits (bf16), the CPU crop rate."""
    from pipeline.guide.model import build_guide
    from pipeline.guide.train import guide_loss, guide_param_groups, guide_train_step

    batch = _guide_batches(cfg, device, n=1)[0]
    torch.manual_seed(0)
    model = build_guide(cfg.model).to(device)
    flops = count_flops(lambda: guide_loss(model, batch, cfg.n_points, np.random.default_rng(0),
                                           cfg.consistency_weight, cfg.body_fraction, cfg.frame)[0].backward())
    del model
    _release(device)

    def fits(pairs: int) -> bool:
        reps = -(-pairs // cfg.optim.batch_size)
        data = {k: torch.cat([v] * reps)[:pairs] for k, v in batch.items()}
        net = build_guide(cfg.model).to(device)
        opt = torch.optim.AdamW(guide_param_groups(net, cfg.optim.weight_decay), lr=cfg.optim.lr)
        for i in range(2):
            guide_train_step(net, opt, data, cfg.n_points, np.random.default_rng(i), cfg.optim.grad_clip,
                             cfg.consistency_weight, cfg.body_fraction, cfg.frame, torch.bfloat16)
        _sync(device)
        return True

    biggest = largest_batch(fits, limit=batch_limit)
    _release(device)
    crops = crop_pairs_per_s(cfg.crop_size_zyx, cfg.optim.batch_size, seconds=crop_seconds)
    _log(f"guide: {flops / 1e12:.3f} TFLOP per step, largest batch {biggest} pairs, CPU crops {crops:.1f} pairs/s")
    return {"guide_tflop_per_step": flops / 1e12, "guide_largest_batch": biggest,
            "guide_crop_pairs_per_s_per_core": crops}


def efficiency_summary(out: dict, device_name: str) -> dict:
    """MFU figures from the measured step rates and counted FLOPs; samples/s; cores a worker needs for crops."""
    extra: dict = {}
    for prefix, rate_key, flop_key in (("pretrain", "pretrain_bf16_steps_per_s", "pretrain_tflop_per_step"),
                                       ("compile", "compile_steps_per_s", "pretrain_tflop_per_step"),
                                       ("guide", "guide_steps_per_s", "guide_tflop_per_step")):
        if rate_key in out and flop_key in out:
            extra.update(mfu_figures(prefix, int(out[flop_key] * 1e12), out[rate_key], device_name))
    if "guide_pairs_per_s" in out and "guide_crop_pairs_per_s_per_core" in out:
        extra["guide_cores_to_feed"] = out["guide_pairs_per_s"] / out["guide_crop_pairs_per_s_per_core"]
    return extra


def figures(device: torch.device, pretrain: PretrainConfig, guide: GuideConfig, steps: int, fit_steps: int,
            with_compile: bool, batch_limit: int = 256, crop_seconds: float = 5.0) -> dict:
    """The figures for given presets on ``device`` (CPU: gloo and fp32 only where bf16 autocast is not
    meaningful; what tests use to keep this path alive without a GPU)."""
    _process_group(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "pretrain_batch": pretrain.optim.batch_size,
           "pretrain_patch_zyx": list(pretrain.patches.patch_size_zyx), "guide_batch_pairs": guide.optim.batch_size,
           "guide_crop_zyx": list(guide.crop_size_zyx)}
    try:
        out.update(pretrain_figures(pretrain, steps, fit_steps, device))
        out.update(pretrain_efficiency(pretrain, device, batch_limit))
        out.update(guide_figures(guide, steps, fit_steps, device))
        out.update(guide_efficiency(guide, device, batch_limit, crop_seconds))
        if with_compile:
            try:
                out.update(compile_figures(pretrain, steps, device))
            except Exception as e:  # noqa: BLE001 - reported, the other figures still count
                out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out | efficiency_summary(out, out["device"])


def run(workdir=None, quick: bool = False, device: str = "cuda") -> dict:
    """All figures of the module docstring: ``pretrain-gpu`` and ``guide-gpu`` on the CUDA device, or
    (``device="cpu"``) a smoke run of the same code on ``pretrain-tiny`` and ``guide-tiny``."""
    from pipeline.config import UserError

    steps, fit_steps = (10, 30) if quick else (30, 150)
    if device == "cpu":
        pretrain = load_config(PretrainConfig, "pretrain-tiny", overrides={"data": "unused"})
        guide = load_config(GuideConfig, "guide-tiny", overrides={"data": "unused"})
        return figures(torch.device("cpu"), pretrain, guide, min(steps, 5), min(fit_steps, 20), with_compile=False,
                       batch_limit=4, crop_seconds=2.0)
    if not torch.cuda.is_available():
        raise UserError("anatdiff benchmark gpu needs a CUDA device (torch.cuda.is_available() is False); "
                        "--device cpu runs the same code on the tiny presets")
    pretrain = load_config(PretrainConfig, "pretrain-gpu", overrides={"data": "unused"})
    guide = load_config(GuideConfig, "guide-gpu", overrides={"data": "unused"})
    return figures(torch.device("cuda"), pretrain, guide, steps, fit_steps, with_compile=not quick,
                   crop_seconds=2.0 if quick else 5.0)
