"""Random spatial and intensity transforms of labelled training patches (nnU-Net's data augmentation, with
CT-sized ranges), for the trainings that see few patients: the supervised ceiling and fine-tuning.

A patch stream cuts patches of ``context_size`` (larger than the network's patch, so that zooming out and
rotating reads real voxels, not padding); ``augment_batch`` resamples each to the network's patch size by one
random affine map per patch (per-axis zoom, rotation about the cranio-caudal axis), image and guide coordinates
trilinearly, label and body mask by nearest neighbour, then changes the image's contrast and brightness and
adds noise. A patch drawn without a spatial transform is the exact central crop. Pure numpy + torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # settings are read by attribute
    from pipeline.config import AugmentConfig


def context_size(size_zyx, cfg: "AugmentConfig") -> tuple[int, int, int]:
    """Patch size to cut so that the largest zoom-out and rotation of a ``size_zyx`` patch stays inside it;
    each axis grows by an even number of voxels (the identity map then lands on voxel centres)."""
    zoom = max(cfg.scale)
    turn = math.radians(cfg.rotate_deg)
    in_plane = zoom * (abs(math.cos(turn)) + abs(math.sin(turn)))
    out = []
    for axis, n in enumerate(size_zyx):
        need = math.ceil(n * (zoom if axis == 0 else in_plane))
        out.append(n + 2 * math.ceil(max(need - n, 0) / 2))
    return tuple(out)


def random_affines(n: int, cfg: "AugmentConfig", rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) maps in ``affine_grid``'s (x, y, z) order, from output to input positions in voxel units:
    identity with probability 1 - ``cfg.p_spatial``, else a per-axis zoom in ``cfg.scale`` (above 1 sees more
    anatomy) then a rotation about z (the cranio-caudal axis) by up to ``cfg.rotate_deg`` either way."""
    maps = np.tile(np.eye(3), (n, 1, 1))
    for i in range(n):
        if rng.random() >= cfg.p_spatial:
            continue
        zoom = np.diag(rng.uniform(*cfg.scale, size=3))
        a = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        turn = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
        maps[i] = turn @ zoom
    return maps


def augment_batch(batch: dict[str, np.ndarray], size_zyx, cfg: "AugmentConfig",
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Resample a batch of ``context_size`` patches (``image`` (B, 1, ...), ``coords`` (B, 3, ...), ``mask``
    (B, ...) bool, ``label`` (B, ...) int) to ``size_zyx`` with ``random_affines``, then, with probability
    ``cfg.p_intensity`` per patch, image x -> (x - mean) * contrast + mean + shift, plus Gaussian noise of a
    standard deviation drawn in [0, ``cfg.noise_std``], clipped to [0, 1]. Other keys pass through."""
    image = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32))
    n, big = image.shape[0], image.shape[2:]
    maps = random_affines(n, cfg, rng)
    # normalised output -> normalised input (align_corners=False, x y z order): diag(1 / in) @ map @ diag(out)
    out_xyz, in_xyz = np.array(size_zyx[::-1], float), np.array(tuple(big)[::-1], float)
    theta = torch.zeros(n, 3, 4, dtype=torch.float32)
    theta[:, :, :3] = torch.from_numpy((maps * out_xyz[None, None, :] / in_xyz[None, :, None]).astype(np.float32))
    grid = F.affine_grid(theta, [n, 1, *size_zyx], align_corners=False)
    smooth = torch.cat([image, torch.from_numpy(np.ascontiguousarray(batch["coords"], dtype=np.float32)),
                        torch.from_numpy(batch["mask"]).float()[:, None]], dim=1)
    smooth = F.grid_sample(smooth, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = dict(batch)
    out["image"] = smooth[:, :1].numpy()
    out["coords"] = smooth[:, 1:4].numpy()
    out["mask"] = smooth[:, 4].numpy() > 0.5
    if "label" in batch:
        label = torch.from_numpy(batch["label"]).float()[:, None]
        out["label"] = F.grid_sample(label, grid, mode="nearest", padding_mode="zeros",
                                     align_corners=False)[:, 0].round().long().numpy()
    img = out["image"]
    for i in range(n):
        if rng.random() >= cfg.p_intensity:
            continue
        mean = float(img[i].mean())
        img[i] = (img[i] - mean) * rng.uniform(*cfg.contrast) + mean + rng.uniform(-cfg.shift, cfg.shift)
        if cfg.noise_std > 0:
            img[i] += rng.normal(0.0, rng.uniform(0.0, cfg.noise_std), size=img[i].shape).astype(np.float32)
    out["image"] = np.clip(img, 0.0, 1.0)
    return out
