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
        # per-channel input normalization (features of all scales concatenated); identity until set
        self.register_buffer("input_mean", torch.zeros(sum(self.feature_channels)))
        self.register_buffer("input_std", torch.ones(sum(self.feature_channels)))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-4) -> None:
        """Standardize each input channel by (x - mean) / (std + eps) before projecting (mean, std: (sum C_i,),
        e.g. from ``FeatureBank.channel_stats``). Trilinear upsampling is affine, so this commutes with it."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std + eps)

    def _normalized(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out, start = [], 0
        for feature, c in zip(features, self.feature_channels):
            mean = self.input_mean[start:start + c].view(1, c, 1, 1, 1)
            std = self.input_std[start:start + c].view(1, c, 1, 1, 1)
            out.append((feature - mean) / std)
            start += c
        return out

    def project_voxels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, sum C_i) feature vectors already at full resolution -> (N, out) projected and summed: what
        ``forward`` computes at each voxel (trilinear upsampling and 1x1x1 convolutions commute)."""
        if x.ndim != 2 or x.shape[1] != sum(self.feature_channels):
            raise ValueError(f"expected (N, {sum(self.feature_channels)}) feature vectors, got {tuple(x.shape)}")
        x = (x - self.input_mean) / self.input_std
        total = None
        for chunk, projection in zip(torch.split(x, self.feature_channels, dim=1), self.projections):
            y = F.linear(chunk, projection.weight.flatten(1), projection.bias)
            total = y if total is None else total + y
        return total

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
        for feature, projection in zip(features, self.projections):
            if feature.ndim != 5 or feature.shape[1] != projection.in_channels:
                raise ValueError(f"feature map of shape {tuple(feature.shape)} does not match "
                                 f"(B, {projection.in_channels}, D, H, W)")
        size = tuple(int(s) for s in out_size_zyx) if out_size_zyx is not None else self._out_size(features)
        total = None
        for feature, projection in zip(self._normalized(features), self.projections):
            y = projection(feature)  # project first: conv1x1 and linear upsampling commute, fewer channels
            if tuple(y.shape[2:]) != size:
                y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
            total = y if total is None else total + y
        return total


class LinearHead(nn.Module):
    """Linear probe: a 1x1x1 conv per scale, upsampled (trilinear) to full resolution and summed.

    forward(features, out_size_zyx=None) -> (B, num_classes, D, H, W) float logits. ``forward_voxels(x)``:
    the same map on (N, sum C_i) feature vectors already at full resolution (a ``FeatureBank`` batch).
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int = NUM_ORGANS,
                 feature_strides: Sequence[int] | None = None):
        super().__init__()
        self.fuse = _MultiScaleSum(feature_channels, num_classes, feature_strides)

    def forward(self, features: Sequence[torch.Tensor],
                out_size_zyx: Sequence[int] | None = None) -> torch.Tensor:
        return self.fuse(features, out_size_zyx)

    def forward_voxels(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse.project_voxels(x)


class _PointwiseBlock(nn.Module):
    """x + Linear(SiLU(LayerNorm(Linear(SiLU(LayerNorm(x)))))) over the last axis (channels-last)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, channels),
                                  nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class NonlinearHead(nn.Module):
    """Non-linear probe: each scale -> ``hidden`` channels (1x1x1 conv), upsampled and summed, then 2
    pre-activation residual blocks acting on each voxel's channels (LayerNorm + SiLU + linear, i.e. 1x1x1
    convolutions), then LayerNorm + SiLU and a linear map to ``num_classes``.

    forward(features, out_size_zyx=None) -> (B, num_classes, D, H, W) float logits; ``forward_voxels(x)``:
    the same on (N, sum C_i) feature vectors already at full resolution.
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int = NUM_ORGANS, hidden: int = 32,
                 feature_strides: Sequence[int] | None = None, num_blocks: int = 2):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be a positive number of channels, got {hidden}")
        self.fuse = _MultiScaleSum(feature_channels, hidden, feature_strides)
        self.blocks = nn.Sequential(*(_PointwiseBlock(hidden) for _ in range(num_blocks)))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, num_classes))

    def _pointwise(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(h_last))

    def forward(self, features: Sequence[torch.Tensor],
                out_size_zyx: Sequence[int] | None = None) -> torch.Tensor:
        return self._pointwise(self.fuse(features, out_size_zyx).movedim(1, -1)).movedim(-1, 1)

    def forward_voxels(self, x: torch.Tensor) -> torch.Tensor:
        return self._pointwise(self.fuse.project_voxels(x))


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
