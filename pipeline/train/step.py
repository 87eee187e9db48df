"""The pretraining step as a pure function of (model, batch, schedule): testable without Ray.

Objectives: ``diffusion`` (DDPM denoising, the method), ``restorative`` (Models Genesis: reconstruct the
original from a corrupted patch), ``contrastive`` (vox2vec: voxel InfoNCE between two overlapping crops, through
a training-only projection head) and ``none`` (random init: no training at all).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import ModelConfig, OptimConfig, PretrainConfig
from pipeline.data.conditioning import cond_channels, guidance_cond
from pipeline.diffusion.objective import diffusion_loss, to_model_range
from pipeline.diffusion.schedules import DiffusionSchedule
from pipeline.models.unet3d import build_denoiser


def build_model(model_cfg: ModelConfig) -> nn.Module:
    """The denoiser / backbone of a pretraining run: 1 image channel in, 1 channel out."""
    return build_denoiser(model_cfg, in_channels=1, out_channels=1, cond_channels=cond_channels(model_cfg))


def build_training_model(cfg: PretrainConfig) -> nn.Module:
    """What the optimizer trains: the backbone, wrapped with its projection head for ``contrastive`` (the
    wrapper's ``backbone`` is what ``save_model`` exports)."""
    model = build_model(cfg.model)
    if cfg.objective == "contrastive":
        from pipeline.baselines.contrastive import ContrastiveModel

        return ContrastiveModel(model, cfg.contrastive.proj_dim)
    return model


def warmup_cosine_lr(step: int, steps: int, warmup_steps: int, peak_lr: float, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``floor`` x the peak at ``steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(steps - warmup_steps, 1), 1.0)
    return peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak learning rate (``warmup_cosine_lr``)."""
    return warmup_cosine_lr(step, optim.steps, optim.warmup_steps, optim.lr)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up (diffusers' ``EMAModel``): ``min(decay, (1 + step) / (10 + step))``.

    Early updates follow the weights closely, so an EMA read after a short run is not mostly the random
    initialization (a fixed 0.99 keeps 0.99^150 = 22 % of it after 150 steps). ``step`` counts from 0.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float


def add_objective_inputs(batch: dict[str, np.ndarray], cfg: PretrainConfig, rank: int,
                         step: int, refs: list | None = None) -> dict[str, np.ndarray]:
    """Inputs the objective needs beyond the patch: the Models Genesis corruption for ``restorative``; for
    ``contrastive`` a second, overlapping view of each patch's volume (``refs``: the stream's VolumeRefs).

    Seeded by (seed, rank, step) like the patch stream, so a resumed run sees the same corruptions.
    """
    if cfg.objective == "restorative":
        from pipeline.baselines.restorative import genesis_corrupt_batch

        rng = np.random.default_rng([cfg.seed, rank, step, 1])
        batch = dict(batch, corrupted=genesis_corrupt_batch(batch["image"], rng).astype(np.float32))
    if cfg.objective == "contrastive":
        from pipeline.baselines.contrastive import add_view_pairs

        if refs is None:
            raise ValueError("objective 'contrastive' needs the volumes (refs) to cut a second view from")
        c = cfg.contrastive
        batch = add_view_pairs(batch, refs, cfg.patches.window_hu, c.voxels_per_view, c.max_shift_fraction,
                               np.random.default_rng([cfg.seed, rank, step, 2]))
    return batch


def batch_to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
            for k, v in batch.items()}


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: PretrainConfig,
                 schedule: DiffusionSchedule | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The objective's loss on one batch (``image`` (B, 1, D, H, W) in [0, 1], ``coords`` (B, 3, ...))."""
    x0 = to_model_range(batch["image"])
    cond = guidance_cond(cfg.model, batch.get("coords"))
    if cfg.objective == "diffusion":
        def model_fn(x_t, t):
            return model(x_t, t, cond)
        loss, _ = diffusion_loss(model_fn, x0, schedule, prediction=cfg.diffusion.prediction)
        return loss
    if cfg.objective == "restorative":
        corrupted = to_model_range(batch["corrupted"])
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        return torch.nn.functional.mse_loss(model(corrupted, t, cond), x0)
    if cfg.objective == "contrastive":
        from pipeline.baselines.contrastive import contrastive_loss

        return contrastive_loss(model, x0, to_model_range(batch["image2"]), cond,
                                guidance_cond(cfg.model, batch.get("coords2")), batch["voxels"],
                                cfg.contrastive.temperature)
    raise ValueError(f"objective '{cfg.objective}' has no loss")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor] | list,
               cfg: PretrainConfig, schedule: DiffusionSchedule | None, step: int,
               autocast_dtype: torch.dtype | None = None) -> StepResult:
    """One optimizer step: LR schedule, (autocast) forward, backward over ``grad_accum_steps`` micro-batches
    (``batch`` may be a list of them; DDP syncs gradients on the last one only), clipping, update."""
    micro = batch if isinstance(batch, list) else [batch]
    lr = lr_at(step, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    device_type = micro[0]["image"].device.type
    total = 0.0
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss = compute_loss(model, mb, cfg, schedule) / len(micro)
            loss.backward()
        total += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return StepResult(loss=total, grad_norm=float(grad_norm), lr=lr)
