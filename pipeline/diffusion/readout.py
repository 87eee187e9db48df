"""Reading a pretrained backbone's features (DDPM-seg, Baranchuk et al. 2022).

The [0, 1] image is mapped to the model range, noised to each timestep t with one fixed noise draw (a diffusion
backbone, or a random one that stands in for it), and the decoder's multi-scale activations of every t are
concatenated per scale. Restorative and contrastive backbones were trained on clean inputs: they are read once,
at t = 0, without noise. torch only: `anatdiff export` ships this module with the backbone, so an exported model
is read by this same function.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.conditioning import guidance_cond
from pipeline.diffusion.objective import to_model_range
from pipeline.diffusion.schedules import DiffusionSchedule, q_sample

#: objectives whose backbones are read on noised inputs ("none": a random backbone of the diffusion architecture)
NOISED_OBJECTIVES = ("diffusion", "none")


def read_timesteps(objective: str, timesteps) -> tuple[int, ...]:
    """The timesteps a backbone of ``objective`` is read at: ``timesteps``, or (0,) for clean-input objectives."""
    return tuple(int(t) for t in timesteps) if objective in NOISED_OBJECTIVES else (0,)


def backbone_features(backbone: nn.Module, model_cfg, schedule: DiffusionSchedule, image01: torch.Tensor,
                      coords: torch.Tensor | None, noise: torch.Tensor, timesteps, objective: str
                      ) -> list[torch.Tensor]:
    """Multi-scale decoder features, coarsest first: (B, C_i * len(read_timesteps), D/s_i, H/s_i, W/s_i) each.

    image01: (B, 1, D, H, W) HU windowed to [0, 1]; coords: (B, 3, D, H, W) guide coordinates (ignored when
    ``model_cfg.guidance`` is "none"); noise: standard normal like ``image01``; ``model_cfg``: the backbone's
    model settings (``ModelConfig`` or any object with its attributes)."""
    x0 = to_model_range(image01)
    cond = guidance_cond(model_cfg, coords)
    noised = objective in NOISED_OBJECTIVES
    schedule = schedule.to(x0.device)
    per_t = []
    for t in read_timesteps(objective, timesteps):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        x_t = q_sample(x0, tt, noise, schedule) if noised and t > 0 else x0
        _, feats = backbone(x_t, tt, cond, return_features=True)
        per_t.append(feats)
    return [torch.cat(level, dim=1) for level in zip(*per_t)]
