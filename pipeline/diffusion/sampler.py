"""DDIM sampling (Song et al. 2021): a quick visual check of a denoiser, or denoising a partly noised input."""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.diffusion.objective import check_prediction
from pipeline.diffusion.schedules import (DiffusionSchedule, predict_eps_from_v, predict_eps_from_x0,
                                          predict_x0_from_eps, predict_x0_from_v)


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` distinct timesteps evenly spaced from ``t_start`` down to 0 (both included)."""
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must be in [1, t_start + 1 = {t_start + 1}], got {steps}")
    if steps == 1:
        return [t_start]
    return [round(t_start - i * t_start / (steps - 1)) for i in range(steps)]


def _x0_eps(pred, x, t, prediction, schedule, clip_x0):
    """(x0_hat, eps_hat) from the network's output; eps re-derived after clipping x0 to [-1, 1]."""
    if prediction == "epsilon":
        x0 = predict_x0_from_eps(x, t, pred, schedule)
        eps = pred
    else:
        x0 = predict_x0_from_v(x, t, pred, schedule)
        eps = predict_eps_from_v(x, t, pred, schedule)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = predict_eps_from_x0(x, t, x0, schedule)
    return x0, eps


@torch.no_grad()
def ddim_sample(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, schedule: DiffusionSchedule,
                steps: int = 50, eta: float = 0.0, prediction: str = "epsilon",
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                x_T: torch.Tensor | None = None, t_start: int | None = None, clip_x0: bool = True) -> torch.Tensor:
    """Run the reverse process from ``x_T`` (default: standard normal of ``shape``) at timestep ``t_start``
    (default T - 1) to t = 0 in ``steps`` DDIM steps; ``eta`` = 0 is deterministic, 1 is DDPM-like.

    To denoise a partly noised input, pass ``x_T = q_sample(x0, t_start, ...)`` and ``t_start``.
    ``shape`` is ignored when ``x_T`` is given. Returns x0 (B, ...) float32 in model range ([-1, 1] when ``clip_x0``).
    """
    check_prediction(prediction)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t_start = schedule.num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < schedule.num_timesteps:
        raise ValueError(f"t_start must be in [0, {schedule.num_timesteps}), got {t_start}")
    device = device if device is not None else (x_T.device if x_T is not None else "cpu")
    schedule = schedule.to(device)
    x = x_T.to(device) if x_T is not None else torch.randn(shape, generator=generator, device=device)
    abar = schedule.alphas_cumprod
    times = ddim_timesteps(t_start, steps)
    for t, t_prev in zip(times, times[1:] + [None]):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        x0, eps = _x0_eps(model_fn(x, tt), x, tt, prediction, schedule, clip_x0)
        if t_prev is None:
            break
        a_t, a_prev = abar[t], abar[t_prev]
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = a_prev.sqrt() * x0 + torch.sqrt(1 - a_prev - sigma ** 2) * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=device)
    return x0
