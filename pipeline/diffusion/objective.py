"""The DDPM training objective: noise a clean patch at a uniform random timestep, regress eps or v (MSE).

Data convention: the windowed image in [0, 1] is mapped to [-1, 1] by ``to_model_range`` before noising.
``model_fn(x_t, t) -> prediction`` wraps any denoiser (the caller closes over its conditioning).
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.diffusion.schedules import DiffusionSchedule, q_sample, v_target

PREDICTIONS = ("epsilon", "v")


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] image -> [-1, 1]: 2 x - 1 (same shape and dtype)."""
    return 2 * x01 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: (x + 1) / 2 (same shape and dtype)."""
    return (x + 1) / 2


def sample_timesteps(batch: int, T: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(batch,) int64 timesteps uniform in [0, T), on ``generator``'s device unless ``device`` is given."""
    if batch < 1 or T < 1:
        raise ValueError(f"sample_timesteps needs batch >= 1 and T >= 1, got batch={batch}, T={T}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randint(0, T, (batch,), generator=generator, device=device)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def diffusion_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   schedule: DiffusionSchedule, prediction: str = "epsilon", t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """MSE between ``model_fn(x_t, t)`` and the target (eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0).

    x0: (B, C, D, H, W) float in [-1, 1]. t: (B,) int64 (default: uniform), noise: like x0 (default:
    standard normal). Returns (loss: scalar tensor, info: {"t": (B,), "loss_per_sample": (B,) detached}).
    """
    check_prediction(prediction)
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(x0, t, noise, schedule)
    target = noise if prediction == "epsilon" else v_target(x0, noise, t, schedule)
    pred = model_fn(x_t, t)
    if pred.shape != target.shape:
        raise ValueError(f"model_fn returned shape {tuple(pred.shape)}, expected {tuple(target.shape)}")
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return per_sample.mean(), {"t": t, "loss_per_sample": per_sample.detach()}
