"""Building blocks of the 3D UNet: timestep embedding, residual blocks with optional FiLM, resampling.

Every block works on (B, C, D, H, W) tensors in either contiguous or ``channels_last_3d`` memory format
(no ``.view`` on activations) and under ``torch.autocast`` (GroupNorm runs in float32 there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def num_groups(channels: int, max_groups: int = 8) -> int:
    """The largest divisor of ``channels`` that is <= ``max_groups`` (GroupNorm groups)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style timestep embedding (Ho et al. 2020).

    t: (B,) int or float timesteps. Returns (B, dim) float32: ``[cos(t * w_k), sin(t * w_k)]`` with
    ``w_k = max_period ** (-k / (dim // 2))``, zero-padded when ``dim`` is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """(B,) timesteps -> (B, dim) float: sinusoidal features followed by a 2-layer SiLU MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))


def _bcast(v: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, 1, 1) by indexing (safe for any memory format)."""
    return v[:, :, None, None, None]


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-Conv3d x2 with a residual path.

    The timestep embedding (B, time_dim) is projected to ``out_ch`` and added after the first conv. With
    ``film_channels > 0`` a (B, film_channels, D, H, W) conditioning map gives a per-voxel scale and shift
    (1x1x1 conv, zero-initialised so training starts from the unconditioned block) applied after the
    second GroupNorm: ``h = norm(h) * (1 + scale) + shift``.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None = None, film_channels: int = 0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups(in_ch), in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch)) if time_dim else None
        self.norm2 = nn.GroupNorm(num_groups(out_ch), out_ch)
        self.film = nn.Conv3d(film_channels, 2 * out_ch, 1) if film_channels else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None,
                film_cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + _bcast(self.time_proj(temb))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(film_cond).chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class Downsample(nn.Module):
    """Halve D, H, W with a strided 3x3x3 convolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double D, H, W: nearest-neighbour interpolation followed by a 3x3x3 convolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UpsampleTransposed(nn.Module):
    """Double D, H, W with a 2x2x2 transposed convolution of stride 2 (each output voxel reads one input
    voxel: ~50x fewer multiply-adds than nearest-neighbour + 3x3x3 at the output resolution)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
