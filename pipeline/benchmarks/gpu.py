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
Progress lines start with ``#``.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import torch

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
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last_3d)
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
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last_3d)
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
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last_3d)
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


def _synthetic_volume(rng: np.random.Generator, shape=(160, 256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU: an elliptic water body with blobs of other densities in air, and its mask."""
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) / (0.35 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.42 * shape[2])) ** 2 < 1
    body = np.broadcast_to(body, shape)
    hu = np.where(body, 40.0, -1000.0)
    for _ in range(12):
        c = rng.uniform(0.2, 0.8, 3) * shape
        r = rng.uniform(8, 30)
        blob = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r ** 2
        hu = np.where(blob & body, rng.uniform(-900, 800), hu)
    return hu.astype(np.int16), body.astype(np.uint8)


def guide_figures(cfg: GuideConfig, steps: int, fit_steps: int, device: torch.device,
                  dtype=torch.bfloat16) -> dict[str, float]:
    from pipeline.guide.crops import sample_crop_pair
    from pipeline.guide.model import build_guide
    from pipeline.guide.train import collate_pairs, guide_param_groups, guide_train_step

    rng = np.random.default_rng(0)
    volume, mask = _synthetic_volume(rng)
    batches = []
    for _ in range(4):
        pairs = [sample_crop_pair(volume, (2.0, 1.5, 1.5), cfg.crop_size_zyx, rng, mask_zyx=mask,
                                  scan_end_probability=cfg.scan_end_probability)
                 for _ in range(cfg.optim.batch_size)]
        batch = collate_pairs(pairs)
        batches.append({k: v.to(device) if k == "image" else v for k, v in batch.items()})
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


def figures(device: torch.device, pretrain: PretrainConfig, guide: GuideConfig, steps: int, fit_steps: int,
            with_compile: bool) -> dict:
    """The figures for given presets on ``device`` (CPU: gloo and fp32 only where bf16 autocast is not
    meaningful; what tests use to keep this path alive without a GPU)."""
    _process_group(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "pretrain_batch": pretrain.optim.batch_size,
           "pretrain_patch_zyx": list(pretrain.patches.patch_size_zyx), "guide_batch_pairs": guide.optim.batch_size,
           "guide_crop_zyx": list(guide.crop_size_zyx)}
    try:
        out.update(pretrain_figures(pretrain, steps, fit_steps, device))
        out.update(guide_figures(guide, steps, fit_steps, device))
        if with_compile:
            try:
                out.update(compile_figures(pretrain, steps, device))
            except Exception as e:  # noqa: BLE001 - reported, the other figures still count
                out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


def run(workdir=None, quick: bool = False) -> dict:
    """All figures of the module docstring, for ``pretrain-gpu`` and ``guide-gpu`` on the CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("anatdiff benchmark gpu needs a CUDA device (torch.cuda.is_available() is False)")
    steps, fit_steps = (10, 30) if quick else (30, 150)
    pretrain = load_config(PretrainConfig, "pretrain-gpu", overrides={"data": "unused"})
    guide = load_config(GuideConfig, "guide-gpu", overrides={"data": "unused"})
    return figures(torch.device("cuda"), pretrain, guide, steps, fit_steps, with_compile=not quick)
