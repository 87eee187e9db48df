"""DDPM noise schedules and the closed-form forward process, named as in the papers.

Timesteps are indices t = 0 .. T-1; ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])`` (abar_t), so
t = 0 is the least noisy step. Schedules are computed in float64 and stored as float32 tensors.
Shapes: x0, x_t, noise, v are (B, ...) float; t is (B,) int64 on the same device as x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the config is read by attribute only: `anatdiff export` ships this module without it
    from pipeline.config import DiffusionConfig


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas linear from ``beta_start`` to ``beta_end``, both scaled by 1000 / T (improved
    DDPM) so that any T keeps the same total noise. Returns (T,) float64."""
    if T < 1:
        raise ValueError(f"T (number of diffusion steps) must be >= 1, got {T}")
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def cosine_beta_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: abar(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2,
    betas[t] = 1 - f(t + 1) / f(t), clipped at ``max_beta``. Returns (T,) float64."""
    if T < 1:
        raise ValueError(f"T (number of diffusion steps) must be >= 1, got {T}")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(0.0, max_beta)


@dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """Per-timestep coefficients, each (T,) float32 on one device."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DiffusionSchedule":
        """From (T,) betas in (0, 1); products are taken in float64."""
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must be a 1-D tensor with values in (0, 1), got shape {tuple(betas.shape)}")
        abar = torch.cumprod(1 - betas, dim=0)
        return cls(betas=betas.float(), alphas_cumprod=abar.float(), sqrt_alphas_cumprod=abar.sqrt().float(),
                   sqrt_one_minus_alphas_cumprod=(1 - abar).sqrt().float())

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "DiffusionSchedule":
        make = {"cosine": cosine_beta_schedule, "linear": linear_beta_schedule}
        if cfg.schedule not in make:
            raise ValueError(f"schedule must be one of {sorted(make)}, got {cfg.schedule!r}")
        return cls.from_betas(make[cfg.schedule](cfg.timesteps))

    def to(self, device: torch.device | str) -> "DiffusionSchedule":
        """The same schedule on ``device`` (self when already there)."""
        if self.betas.device == torch.device(device):
            return self
        return DiffusionSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def extract(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``coef[t]`` reshaped to (B, 1, ..., 1) to broadcast against ``like`` (B, ...)."""
    out = coef.to(like.device)[t.to(like.device).long()]
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule) -> torch.Tensor:
    """Velocity (Salimans & Ho 2022): v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def predict_x0_from_eps(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                        schedule: DiffusionSchedule) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return ((x_t - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
            / extract(schedule.sqrt_alphas_cumprod, t, x_t))


def predict_eps_from_x0(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                        schedule: DiffusionSchedule) -> torch.Tensor:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    return ((x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x0)
            / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t))


def predict_x0_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                      schedule: DiffusionSchedule) -> torch.Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def predict_eps_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                       schedule: DiffusionSchedule) -> torch.Tensor:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v)
