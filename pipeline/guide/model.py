"""The coordinate guide network: CT crop -> per-voxel anatomical coordinates in [0, 1]^3 (APE-style).

A small FPN built from the UNet's blocks: a patchifying stem (kernel = stride = ``stride``) so every level works
at ``stride * 2**i``, an encoder of residual blocks, a top-down decoder with skip connections back to the
stem's resolution, and a 1x1x1 head with a sigmoid. Every parameter is used in ``forward`` (no unused
parameters under DDP) and nothing is computed at full resolution. The per-axis scale (mm per coordinate
unit) that the distance loss uses lives here too, so it is trained and saved with the network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.inputs import air_value, pad_to_multiple, scale_hu
from pipeline.models.blocks import Downsample, ResBlock3D, Upsample, num_groups

#: APE's intensity window: HU clipped to it and mapped to [0, 1] before the guide sees a crop.
GUIDE_WINDOW_HU = (-1000.0, 300.0)


class CoordinateGuide(nn.Module):
    """Predicts universal body coordinates (z, y, x channels, each in [0, 1]) for every voxel of a crop.

    channels: features per level; level i works at stride ``stride * 2**i``.
    stride: output stride of ``forward`` (APE: 4).
    init_axis_scale_mm: initial mm per coordinate unit along (z, y, x); learned (``axis_scale_mm``).
    padding_mode: of every padded conv. "replicate" (default) hides where a crop ends: with zero padding the
        network can read its position inside the crop from the border and learns crop-relative coordinates
        (measured: landmark spread 1.85 with zeros vs 0.63 with replicate, docs/guide.md).
    Input: (B, 1, D, H, W) float, HU in ``GUIDE_WINDOW_HU`` scaled to [0, 1]; D, H, W multiples of
    ``size_multiple`` (= stride * 2**(levels - 1)).
    """

    def __init__(self, channels=(16, 32, 64), stride: int = 4, blocks_per_level: int = 1,
                 init_axis_scale_mm=(1000.0, 1000.0, 1000.0), padding_mode: str = "replicate"):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1 or any(c < 1 or c % 8 for c in channels) or int(stride) < 1 or blocks_per_level < 1:
            raise ValueError(f"CoordinateGuide needs channels that are positive multiples of 8, stride >= 1 and "
                             f"blocks_per_level >= 1; got channels={channels}, stride={stride}, "
                             f"blocks_per_level={blocks_per_level}")
        scale = torch.as_tensor(init_axis_scale_mm, dtype=torch.float32)
        if scale.shape != (3,) or not bool((scale > 0).all()):
            raise ValueError(f"init_axis_scale_mm must be 3 positive mm values (z, y, x), got {init_axis_scale_mm}")
        self.channels, self.stride, self.blocks_per_level = channels, int(stride), int(blocks_per_level)
        self.size_multiple = self.stride * 2 ** (len(channels) - 1)
        c = channels
        self.stem = nn.Conv3d(1, c[0], kernel_size=self.stride, stride=self.stride)
        self.enc = nn.ModuleList(self._stage(c[i], c[i]) for i in range(len(c)))
        self.down = nn.ModuleList(Downsample(c[i], c[i + 1]) for i in range(len(c) - 1))
        self.up = nn.ModuleList(Upsample(c[i + 1], c[i]) for i in range(len(c) - 1))
        self.dec = nn.ModuleList(self._stage(2 * c[i], c[i]) for i in range(len(c) - 1))
        self.head = nn.Sequential(nn.GroupNorm(num_groups(c[0]), c[0]), nn.SiLU(), nn.Conv3d(c[0], 3, 1))
        self.log_axis_scale_mm = nn.Parameter(scale.log())
        if padding_mode not in ("zeros", "replicate", "reflect"):
            raise ValueError(f"padding_mode must be zeros, replicate or reflect, got {padding_mode!r}")
        self.padding_mode = padding_mode
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and any(p > 0 for p in m.padding):
                m.padding_mode = padding_mode

    def _stage(self, first_in: int, ch: int) -> nn.ModuleList:
        return nn.ModuleList(ResBlock3D(first_in if b == 0 else ch, ch) for b in range(self.blocks_per_level))

    @property
    def axis_scale_mm(self) -> torch.Tensor:
        """(3,) float: mm per coordinate unit along (z, y, x), always positive (stored as a log)."""
        return self.log_axis_scale_mm.exp()

    def config(self) -> dict:
        """Constructor arguments, JSON-serializable (what ``save_guide`` stores)."""
        return {"channels": list(self.channels), "stride": self.stride, "blocks_per_level": self.blocks_per_level,
                "padding_mode": self.padding_mode}

    def _check_input(self, x: torch.Tensor) -> None:
        m = self.size_multiple
        if x.ndim != 5 or x.shape[1] != 1 or any(s % m for s in x.shape[2:]):
            raise ValueError(f"the guide needs x of shape (B, 1, D, H, W) with D, H, W multiples of {m}, "
                             f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1] -> (B, 3, D/stride, H/stride, W/stride) coordinates in [0, 1]."""
        self._check_input(x)
        h = self.stem(x)
        skips = []
        for i, blocks in enumerate(self.enc):
            for block in blocks:
                h = block(h)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        for i in reversed(range(len(self.dec))):
            h = torch.cat([self.up[i](h), skips[i]], dim=1)
            for block in self.dec[i]:
                h = block(h)
        return torch.sigmoid(self.head(h))

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 3, D, H, W): ``forward`` upsampled trilinearly (align_corners=False)."""
        return F.interpolate(self(x), size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)


@torch.no_grad()
def whole_volume_coords(guide: CoordinateGuide, volume_hu_zyx: np.ndarray,
                        window_hu=GUIDE_WINDOW_HU) -> np.ndarray:
    """(3, D, H, W) float32 coordinates of a whole (D, H, W) HU volume in one pass: HU windowed to [0, 1],
    padded with air to multiples of ``size_multiple``, ``forward_full``, cropped back. Runs in eval mode on
    the guide's device (its mode is restored)."""
    device = next(guide.parameters()).device
    x = torch.from_numpy(scale_hu(np.asarray(volume_hu_zyx), window_hu))[None, None].to(device)
    d, h, w = x.shape[2:]
    was_training = guide.training
    guide.eval()
    out = guide.forward_full(pad_to_multiple(x, guide.size_multiple, air_value(window_hu)))
    guide.train(was_training)
    return out[0, :, :d, :h, :w].float().cpu().numpy()


def build_guide(model_cfg) -> CoordinateGuide:
    """The guide of a ``GuideConfig.model`` section (channels, stride, blocks_per_level, padding_mode)."""
    return CoordinateGuide(channels=model_cfg.channels, stride=model_cfg.stride,
                           blocks_per_level=model_cfg.blocks_per_level, padding_mode=model_cfg.padding_mode)


def sample_coords(coord_maps: torch.Tensor, index_zyx: torch.Tensor, stride: int) -> torch.Tensor:
    """Trilinear read of stride-``stride`` coordinate maps at full-resolution voxel positions.

    coord_maps: (B, C, d, h, w) float, output of ``CoordinateGuide.forward``.
    index_zyx: (B, P, 3) float voxel indices (z, y, x) in the full-resolution crop (may be fractional).
    Returns (B, P, C): the same values ``forward_full`` gives at integer indices (edges clamped).
    """
    full = torch.tensor([s * stride for s in coord_maps.shape[2:]], dtype=index_zyx.dtype,
                        device=index_zyx.device)
    grid = 2.0 * (index_zyx + 0.5) / full - 1.0                       # align_corners=False convention
    grid = grid.flip(-1)[:, :, None, None, :].to(coord_maps.dtype)    # grid_sample wants (x, y, z)
    out = F.grid_sample(coord_maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, :, 0, 0].transpose(1, 2)


