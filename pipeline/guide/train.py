"""The guide's pure training step: collate crop pairs, sample voxels, compute both losses, step.

No Ray and no MLflow here: the distributed loop calls ``guide_train_step`` with a (possibly DDP-wrapped)
model and logs the returned ``info``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from pipeline.guide.bpr import bpr_loss
from pipeline.guide.crops import crop_positions_mm
from pipeline.guide.losses import consistency_loss, distance_loss, mean_pairwise_distance
from pipeline.guide.model import sample_coords
from pipeline.models.weights import unwrap

PAIR_KEYS = ("image", "body", "origin_zyx_mm", "spacing_zyx_mm")


def collate_pairs(pairs: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack ``sample_crop_pair`` outputs: ``image`` (B, 2, 1, D, H, W) float32, ``body`` (B, 2, D, H, W)
    bool, ``origin_zyx_mm`` and ``spacing_zyx_mm`` (B, 2, 3) float64."""
    if not pairs:
        raise ValueError("collate_pairs got no crop pairs")
    missing = [k for k in PAIR_KEYS if k not in pairs[0]]
    if missing:
        raise ValueError(f"crop pairs lack {missing}; expected the keys of sample_crop_pair: {PAIR_KEYS}")
    return {k: torch.from_numpy(np.stack([np.asarray(p[k]) for p in pairs])) for k in PAIR_KEYS}




def sample_voxel_indices(body: np.ndarray, n_points: int, rng: np.random.Generator,
                         body_fraction: float = 0.5) -> np.ndarray:
    """(n_points, 3) int64 voxel indices (z, y, x) of one crop: ``body_fraction`` from the body mask
    (D, H, W) bool, the rest from outside it (from anywhere when one of the two sets is empty)."""
    flat = body.reshape(-1)
    inside, outside = np.flatnonzero(flat), np.flatnonzero(~flat)
    n_in = int(round(n_points * body_fraction)) if len(inside) and len(outside) else 0
    pool_in = inside if n_in else np.arange(flat.size)
    picks = np.concatenate([rng.choice(pool_in, n_in), rng.choice(outside if n_in else pool_in, n_points - n_in)])
    return np.stack(np.unravel_index(picks, body.shape), axis=-1).astype(np.int64)


def sample_overlap_indices(origin_zyx_mm: np.ndarray, spacing_zyx_mm: np.ndarray, crop_size_zyx, n_points: int,
                           rng: np.random.Generator) -> np.ndarray:
    """(2, n_points, 3) float64 crop indices of the same random physical points, seen in crop 0 and crop 1.

    origin_zyx_mm, spacing_zyx_mm: (2, 3) of one pair. Points are uniform in the crops' overlap box (mm).
    """
    last = origin_zyx_mm + (np.asarray(crop_size_zyx) - 1) * spacing_zyx_mm
    lo, hi = origin_zyx_mm.max(axis=0), last.min(axis=0)
    if np.any(hi < lo):
        raise ValueError(f"the two crops do not overlap (overlap box {lo} .. {hi} mm)")
    points_mm = rng.uniform(lo, hi, size=(n_points, 3))
    return (points_mm[None] - origin_zyx_mm[:, None]) / spacing_zyx_mm[:, None]


def _sample_points(pair_batch: dict[str, torch.Tensor], n_points: int, rng: np.random.Generator,
                   body_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: (B, 2, 2 * n_points, 3) crop indices (n voxels for the distance loss, then n overlap points)
    and (B, 2 * n_points, 3) mm positions of the distance-loss voxels of crop 0 then crop 1."""
    body = pair_batch["body"].numpy()
    origin, spacing = pair_batch["origin_zyx_mm"].numpy(), pair_batch["spacing_zyx_mm"].numpy()
    size = body.shape[2:]
    index, pos = [], []
    for b in range(body.shape[0]):
        vox = np.stack([sample_voxel_indices(body[b, c], n_points, rng, body_fraction) for c in range(2)])
        overlap = sample_overlap_indices(origin[b], spacing[b], size, n_points, rng)
        index.append(np.concatenate([vox.astype(np.float64), overlap], axis=1))
        pos.append(crop_positions_mm(origin[b][:, None], spacing[b][:, None], vox).reshape(-1, 3))
    return np.stack(index), np.stack(pos)


def guide_loss(model: nn.Module, pair_batch: dict[str, torch.Tensor], n_points: int, rng: np.random.Generator,
               consistency_weight: float = 1.0, body_fraction: float = 0.5,
               frame: str = "axes", autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """APE objective on a collated batch of B crop pairs.

    Per pair, ``n_points`` voxels of each crop (``body_fraction`` body, rest background) give the distance
    loss over all 2n of them (both crops, one scan's frame); ``n_points`` random physical points of the
    overlap, read from both crops' coordinate maps, give the consistency loss. The consistency term compares
    coordinates in the distance loss's units (times ``axis_scale_mm``, over the mean physical distance).
    ``frame``: see ``distance_loss`` ("axes": anatomical axes, "rigid": APE's Euclidean distances).
    ``autocast_dtype`` (e.g. bf16 on GPU): the network runs under autocast; coordinates are read and both
    losses computed in float32 (distances of ~1e-3 coordinate units need the precision).
    Returns (scalar loss, info: floats ``loss``, ``distance_loss``, ``consistency_loss``,
    ``axis_scale_{z,y,x}_mm``).
    """
    guide = unwrap(model)
    image = pair_batch["image"]
    n_pairs = image.shape[0]
    amp = (torch.autocast(image.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        maps = model(image.flatten(0, 1).float())                        # (2B, 3, d, h, w)
    maps = maps.float()
    index, pos_mm = _sample_points(pair_batch, n_points, rng, body_fraction)
    index_t = torch.from_numpy(index).to(maps.device, torch.float32).flatten(0, 1)   # (2B, 2n, 3)
    coords = sample_coords(maps, index_t, guide.stride).reshape(n_pairs, 2, 2 * n_points, 3)
    scale = guide.axis_scale_mm
    pos_t = torch.from_numpy(pos_mm).to(maps.device, torch.float32)
    dist = distance_loss(torch.cat([coords[:, 0, :n_points], coords[:, 1, :n_points]], dim=1), pos_t, scale,
                         frame)
    ref_mm = mean_pairwise_distance(pos_t).clamp_min(1e-6)[:, None, None]
    overlap = coords[:, :, n_points:] * scale / ref_mm[:, None]
    cons = consistency_loss(overlap[:, 0], overlap[:, 1])
    loss = dist + consistency_weight * cons
    info = {"loss": float(loss.detach()), "distance_loss": float(dist.detach()),
            "consistency_loss": float(cons.detach())}
    info.update({f"axis_scale_{a}_mm": float(s) for a, s in zip("zyx", scale.detach().cpu())})
    return loss, info


def guide_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on conv weights only, none on biases, norms and the log axis
    scale (decay would pull the mm-per-unit scale towards 1 mm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "log_axis_scale" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, compute_loss,
                    grad_clip: float) -> dict[str, float]:
    """zero_grad, ``compute_loss() -> (loss, info)``, backward, clip, step; info plus ``grad_norm`` (before
    clipping)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, info = compute_loss()
    loss.backward()
    info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    return info


def guide_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, pair_batch: dict[str, torch.Tensor],
                     n_points: int, rng: np.random.Generator, grad_clip: float = 1.0,
                     consistency_weight: float = 1.0, body_fraction: float = 0.5,
                     frame: str = "axes", autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One optimizer step of ``guide_loss``; returns its info plus ``grad_norm`` (before clipping)."""
    return _optimizer_step(model, optimizer, lambda: guide_loss(model, pair_batch, n_points, rng, consistency_weight,
                                                                body_fraction, frame, autocast_dtype), grad_clip)


def bpr_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   grad_clip: float = 1.0, consistency_weight: float = 1.0,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One optimizer step of ``bpr.bpr_loss`` (the 1-D guide); its info plus ``grad_norm`` (before clipping)."""
    def compute():
        with (torch.autocast(batch["image"].device.type, dtype=autocast_dtype) if autocast_dtype
              else contextlib.nullcontext()):
            return bpr_loss(model, batch, consistency_weight)

    return _optimizer_step(model, optimizer, compute, grad_clip)
