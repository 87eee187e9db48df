"""Coordinates -> the denoiser's conditioning channels: the one home of this convention.

Training (``train/step.py``), feature extraction for evaluation and predict (``diffusion/readout.py``), the
sample preview and exported backbones (``evaluation/export.py`` ships this module) all encode coordinates
here; the patch stream and the segmenter take body-box coordinates from here.

Coordinates are (B, 3, D, H, W) with channel order (z, y, x), about [0, 1] over the body (APE convention),
from one of two sources: the learned guide's map (``guidance: learned``, pipeline/guide) or
``bodybox_coords``, the geometric guide (position in the body's bounding box, ``guidance: bodybox``).
Outside the volume coordinates are 0 in every channel, whatever their source: ``data/patches.py``'s
``patch_coords`` pads a patch's learned map and zeroes its body-box coordinates there, and sliding windows
pad with 0. ``bodybox_coords`` itself is a formula that extrapolates; the rule applies where patches are cut.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the config is read by attribute only: `anatdiff export` ships this module without it
    from pipeline.config import ModelConfig

ENCODINGS = ("raw", "sincos")


def sincos_encode(coords: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """APE-style Fourier features of (B, 3, D, H, W) coordinates.

    Returns (B, 6 F, D, H, W) in coords' float dtype, values in [-1, 1]: channels [0, 3F) are
    ``sin(2**k * pi * c_a)`` and [3F, 6F) the matching cosines, channel ``a * F + k`` within each half
    for axis a in (z, y, x) and frequency k = 0 .. F - 1.
    """
    if coords.ndim != 5 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (B, 3, D, H, W), got {tuple(coords.shape)}")
    if num_frequencies < 1:
        raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
    coords = coords.float() if not coords.is_floating_point() else coords
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=coords.dtype, device=coords.device)
    scaled = (coords[:, :, None] * freqs[None, None, :, None, None, None]).flatten(1, 2)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def encoding_channels(encoding: str, num_frequencies: int) -> int:
    """Channels ``encode_coords`` produces: 3 for "raw", 6 * num_frequencies for "sincos"."""
    if encoding == "raw":
        return 3
    if encoding == "sincos":
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
        return 6 * num_frequencies
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def encode_coords(coords: torch.Tensor, encoding: str, num_frequencies: int) -> torch.Tensor:
    """(B, 3, D, H, W) coordinates -> (B, encoding_channels(encoding, F), D, H, W) float conditioning."""
    if encoding == "raw":
        if coords.ndim != 5 or coords.shape[1] != 3:
            raise ValueError(f"coords must be (B, 3, D, H, W), got {tuple(coords.shape)}")
        return coords if coords.is_floating_point() else coords.float()
    if encoding == "sincos":
        return sincos_encode(coords, num_frequencies)
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def bodybox_coords(shape_zyx, bbox_zyx, offset_zyx) -> np.ndarray:
    """(3, D, H, W) float32: each voxel's position normalised to the body's bounding box.

    shape_zyx: patch size (D, H, W) in voxels; bbox_zyx: inclusive (first, last) body voxel per axis in the
    full volume; offset_zyx: the patch's first voxel in the full volume (may be negative). Channel order
    (z, y, x): 0 at the box's first voxel, 1 at its last (a one-voxel box divides by 1); voxels outside
    the box get values outside [0, 1].
    """
    if len(shape_zyx) != 3 or len(bbox_zyx) != 3 or len(offset_zyx) != 3 or min(shape_zyx) < 1:
        raise ValueError(f"bodybox_coords needs 3 positive sizes, 3 (first, last) pairs and 3 offsets; got "
                         f"shape_zyx={shape_zyx}, bbox_zyx={bbox_zyx}, offset_zyx={offset_zyx}")
    grids = []
    for axis, (n, (first, last), off) in enumerate(zip(shape_zyx, bbox_zyx, offset_zyx)):
        if last < first:
            raise ValueError(f"bbox_zyx axis {axis}: last voxel {last} < first voxel {first}")
        vals = (np.arange(off, off + n, dtype=np.float64) - first) / max(last - first, 1)
        view = [1, 1, 1]
        view[axis] = n
        grids.append(np.broadcast_to(vals.reshape(view), tuple(shape_zyx)))
    return np.stack(grids).astype(np.float32)


def cond_channels(model_cfg: ModelConfig) -> int:
    """Channels of the per-voxel guidance fed to the denoiser (0 when unguided)."""
    if model_cfg.guidance == "none":
        return 0
    return encoding_channels(model_cfg.guidance_encoding, model_cfg.guidance_frequencies)


def guidance_cond(model_cfg: ModelConfig, coords: torch.Tensor | None) -> torch.Tensor | None:
    """Encode (B, 3, D, H, W) coordinates as configured: (B, cond_channels(model_cfg), D, H, W) float, or
    None when unguided (or no coordinates were given)."""
    if model_cfg.guidance == "none" or coords is None:
        return None
    return encode_coords(coords, model_cfg.guidance_encoding, model_cfg.guidance_frequencies)
