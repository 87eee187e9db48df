"""Segmentation heads trained on FROZEN multi-scale features (vox2vec's linear / non-linear protocols).

Input: ``features``, a list of (B, C_i, D_i, H_i, W_i) float tensors, coarsest first, with channels
``feature_channels[i]``. Output: (B, num_classes, D, H, W) logits at full resolution, one sigmoid output per
organ (channel k is BTCV label k + 1; background is implicit).

The full-resolution size is, in order of precedence: ``out_size_zyx`` given to ``forward``; the finest
feature's size times its stride when ``feature_strides`` was given; else the finest feature's own size.
Every layer after upsampling acts on one voxel at a time (1x1x1 convs, per-voxel channel LayerNorm), so a
head's output does not depend on the patch it is computed in: sliding windows stitch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.labels import NUM_ORGANS


class _MultiScaleSum(nn.Module):
    """1x1x1 conv per scale, trilinear upsampling to full resolution, sum over scales -> (B, out, D, H, W)."""

    def __init__(self, feature_channels: Sequence[int], out_channels: int,
                 feature_strides: Sequence[int] | None = None):
        super().__init__()
        if not feature_channels or any(int(c) < 1 for c in feature_channels):
            raise ValueError(f"feature_channels must be positive ints, one per scale, got {feature_channels}")
        if feature_strides is not None and (len(feature_strides) != len(feature_channels)
                                            or any(int(s) < 1 for s in feature_strides)):
            raise ValueError(f"feature_strides must be positive ints, one per scale "
                             f"({len(feature_channels)}), got {feature_strides}")
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.feature_strides = None if feature_strides is None else tuple(int(s) for s in feature_strides)
        self.projections = nn.ModuleList(nn.Conv3d(c, out_channels, 1) for c in self.feature_channels)

    def _out_size(self, features: Sequence[torch.Tensor]) -> tuple[int, int, int]:
        sizes = [tuple(f.shape[2:]) for f in features]
        finest = max(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1] * sizes[i][2])
        stride = 1 if self.feature_strides is None else self.feature_strides[finest]
        return tuple(s * stride for s in sizes[finest])

    def forward(self, features: Sequence[torch.Tensor],
                out_size_zyx: Sequence[int] | None = None) -> torch.Tensor:
        if len(features) != len(self.projections):
            raise ValueError(f"head expects {len(self.projections)} feature maps (channels "
                             f"{self.feature_channels}), got {len(features)}")
        size = tuple(int(s) for s in out_size_zyx) if out_size_zyx is not None else self._out_size(features)
        total = None
        for feature, projection in zip(features, self.projections):
            if feature.ndim != 5 or feature.shape[1] != projection.in_channels:
                raise ValueError(f"feature map of shape {tuple(feature.shape)} does not match "
                                 f"(B, {projection.in_channels}, D, H, W)")
            y = projection(feature)  # project first: conv1x1 and linear upsampling commute, fewer channels
            if tuple(y.shape[2:]) != size:
                y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
            total = y if total is None else total + y
        return total


class LinearHead(nn.Module):
    """Linear probe: a 1x1x1 conv per scale, upsampled (trilinear) to full resolution and summed.

    forward(features, out_size_zyx=None) -> (B, num_classes, D, H, W) float logits.
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int = NUM_ORGANS,
                 feature_strides: Sequence[int] | None = None):
        super().__init__()
        self.fuse = _MultiScaleSum(feature_channels, num_classes, feature_strides)

    def forward(self, features: Sequence[torch.Tensor],
                out_size_zyx: Sequence[int] | None = None) -> torch.Tensor:
        return self.fuse(features, out_size_zyx)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, D, H, W), per voxel (independent of batch and patch)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class _ResidualBlock(nn.Module):
    """x + conv1x1(SiLU(norm(conv1x1(SiLU(norm(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ChannelLayerNorm(channels), nn.SiLU(), nn.Conv3d(channels, channels, 1),
                                  ChannelLayerNorm(channels), nn.SiLU(), nn.Conv3d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class NonlinearHead(nn.Module):
    """Non-linear probe: each scale -> ``hidden`` channels (1x1x1 conv), upsampled and summed, then 2
    pre-activation residual blocks of 1x1x1 convs (channel LayerNorm + SiLU), then LayerNorm + SiLU and a
    1x1x1 conv to ``num_classes``.

    forward(features, out_size_zyx=None) -> (B, num_classes, D, H, W) float logits.
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int = NUM_ORGANS, hidden: int = 32,
                 feature_strides: Sequence[int] | None = None, num_blocks: int = 2):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be a positive number of channels, got {hidden}")
        self.fuse = _MultiScaleSum(feature_channels, hidden, feature_strides)
        self.blocks = nn.Sequential(*(_ResidualBlock(hidden) for _ in range(num_blocks)))
        self.out = nn.Sequential(ChannelLayerNorm(hidden), nn.SiLU(), nn.Conv3d(hidden, num_classes, 1))

    def forward(self, features: Sequence[torch.Tensor],
                out_size_zyx: Sequence[int] | None = None) -> torch.Tensor:
        return self.out(self.blocks(self.fuse(features, out_size_zyx)))


HEAD_KINDS = ("linear", "nonlinear")


def build_head(kind: str, feature_channels: Sequence[int], num_classes: int = NUM_ORGANS,
               hidden: int = 32, feature_strides: Sequence[int] | None = None) -> nn.Module:
    """The head named by ``kind`` ("linear" | "nonlinear", as ``EvaluateConfig.protocol``).

    ``hidden`` is used by the non-linear head only.
    """
    if kind == "linear":
        return LinearHead(feature_channels, num_classes, feature_strides)
    if kind == "nonlinear":
        return NonlinearHead(feature_channels, num_classes, hidden, feature_strides)
    raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
