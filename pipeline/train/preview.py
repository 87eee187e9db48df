"""A quick visual check of a diffusion backbone: noise a real patch, denoise it with DDIM, save a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import PretrainConfig
from pipeline.diffusion.objective import from_model_range, to_model_range
from pipeline.diffusion.sampler import ddim_sample
from pipeline.diffusion.schedules import DiffusionSchedule, q_sample
from pipeline.data.conditioning import guidance_cond


@torch.no_grad()
def denoise_preview(model: nn.Module, batch: dict[str, torch.Tensor], cfg: PretrainConfig,
                    schedule: DiffusionSchedule, t_start: int = 400, steps: int = 20,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Central axial slices (H, W) of the first patch: ``clean``, ``noisy`` (at ``t_start``), ``denoised``.

    All in [0, 1]. ``model`` is the EMA backbone in eval mode.
    """
    x0 = to_model_range(batch["image"][:1].float())
    cond = guidance_cond(cfg.model, batch.get("coords", None)[:1] if "coords" in batch else None)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    t = torch.full((1,), t_start, dtype=torch.long, device=x0.device)
    x_t = q_sample(x0, t, noise, schedule)
    out = ddim_sample(lambda x, tt: model(x, tt, cond), None, schedule, steps=steps, x_T=x_t, t_start=t_start,
                      prediction=cfg.diffusion.prediction)
    z = x0.shape[2] // 2
    return {name: from_model_range(v)[0, 0, z].clamp(0, 1).float().cpu().numpy()
            for name, v in (("clean", x0), ("noisy", x_t), ("denoised", out))}


def save_preview_png(slices: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 * len(slices), 3.2))
    axes = fig.subplots(1, len(slices))
    for ax, (name, img) in zip(axes, slices.items()):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    return Path(path)
