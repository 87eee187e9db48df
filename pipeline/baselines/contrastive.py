"""The contrastive baseline (vox2vec, Goncharov et al. MICCAI 2023): voxel-level InfoNCE between two
overlapping crops of one scan.

Each patch of the pretraining stream is view 1; view 2 is a second crop of the same volume whose corner is
shifted by a random whole number of voxels (both at the volume's spacing), so voxel ``v`` of view 1 and voxel
``v - shift`` of view 2 are the same physical voxel: a positive pair. Both views get their own intensity
augmentation. The backbone (the same ``UNet3D`` as every other objective, at t = 0) gives multi-scale decoder
features; the features of a voxel at every scale are concatenated (vox2vec's feature pyramid), sent through
a projection head (training only: it is not part of the exported backbone) and L2-normalised. The loss is
vox2vec's symmetric InfoNCE: every other sampled voxel of either view in the batch is a negative.

Data side (numpy): ``overlapping_start``, ``positive_voxels``, ``add_view_pairs``. Model side (torch):
``select_voxel_features``, ``ProjectionHead``, ``ContrastiveModel``, ``info_nce``, ``contrastive_loss``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.inputs import PAD_HU, scale_hu
from pipeline.data.patches import cut_patch, patch_coords
from pipeline.guide.crops import augment_intensity

#: tries at a random shift before falling back to a shift of 0 (views overlapping wholly)
_SHIFT_TRIES = 8


# --------------------------------------------------------------------------------------------- data side
def overlapping_start(start_zyx: np.ndarray, size_zyx, max_shift_fraction: float,
                      rng: np.random.Generator) -> np.ndarray:
    """(3,) int64 corner of view 2: ``start_zyx`` + a shift uniform in [-floor(f * n), floor(f * n)] voxels
    per axis (f = ``max_shift_fraction`` < 1, n the patch side), so the two views always overlap."""
    reach = np.floor(np.asarray(size_zyx) * max_shift_fraction).astype(np.int64)
    return np.asarray(start_zyx, dtype=np.int64) + rng.integers(-reach, reach + 1)


def _overlap_box(start1: np.ndarray, start2: np.ndarray, size: np.ndarray, shape: np.ndarray):
    """(lo, hi) voxel box, in view-1 coordinates, seen by both views and lying inside the volume."""
    lo = np.maximum.reduce([np.zeros(3, np.int64), start2 - start1, -start1])
    hi = np.minimum.reduce([size, start2 - start1 + size, shape - start1])
    return lo, hi


def positive_voxels(body1_zyx: np.ndarray, start1_zyx, start2_zyx, volume_shape_zyx, n_voxels: int,
                    rng: np.random.Generator) -> np.ndarray | None:
    """(2, n_voxels, 3) int64 voxel indices (z, y, x) of the same physical voxels in view 1 and view 2.

    Drawn without repetition from the voxels both views see inside the volume: body voxels (``body1_zyx``,
    view 1's (D, H, W) bool body mask) first, then others. None when fewer than ``n_voxels`` exist.
    """
    size = np.asarray(body1_zyx.shape, dtype=np.int64)
    start1, start2 = np.asarray(start1_zyx, np.int64), np.asarray(start2_zyx, np.int64)
    lo, hi = _overlap_box(start1, start2, size, np.asarray(volume_shape_zyx, np.int64))
    if np.prod(np.maximum(hi - lo, 0)) < n_voxels:
        return None
    body = np.asarray(body1_zyx[tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=bool).ravel()
    inside, outside = np.flatnonzero(body), np.flatnonzero(~body)
    if len(inside) >= n_voxels:
        picks = rng.choice(inside, n_voxels, replace=False)
    else:
        picks = np.concatenate([inside, rng.choice(outside, n_voxels - len(inside), replace=False)])
    v1 = np.stack(np.unravel_index(picks, tuple(hi - lo)), axis=-1) + lo
    return np.stack([v1, v1 + start1 - start2]).astype(np.int64)


def _second_view(ref, start1, size, n_voxels, body1, max_shift_fraction, rng):
    """(start2, voxels) with ``n_voxels`` shared voxels; a shift of 0 when random shifts share too few."""
    for _ in range(_SHIFT_TRIES):
        start2 = overlapping_start(start1, size, max_shift_fraction, rng)
        voxels = positive_voxels(body1, start1, start2, ref.shape_zyx, n_voxels, rng)
        if voxels is not None:
            return start2, voxels
    voxels = positive_voxels(body1, start1, start1, ref.shape_zyx, n_voxels, rng)
    if voxels is None:
        raise ValueError(f"a volume of {tuple(ref.shape_zyx)} voxels shares fewer than contrastive.voxels_per_view"
                         f" = {n_voxels} voxels with a {tuple(size)} patch; lower contrastive.voxels_per_view")
    return np.asarray(start1, np.int64), voxels


def add_view_pairs(batch: dict[str, np.ndarray], refs: list, window_hu, n_voxels: int,
                   max_shift_fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """View pairs for a ``PatchStream`` batch (``image`` (B, 1, D, H, W), ``start``, ``mask``, ``volume_index``).

    Returns the batch with ``image`` = view 1 augmented, ``image2`` (B, 1, D, H, W) float32 = view 2 augmented,
    ``coords2`` (B, 3, D, H, W) float32 (when the batch has ``coords``), ``start2`` (B, 3) int64 (view 2's corner
    in the volume) and ``voxels`` (B, 2, K, 3) int64: ``voxels[b, 0, k]`` in view 1 and ``voxels[b, 1, k]`` in
    view 2 are the same physical voxel (``start + voxels[:, 0] == start2 + voxels[:, 1]``).
    """
    if "volume_index" not in batch:
        raise ValueError("the contrastive objective needs the batch's volume_index (PatchStream.batch gives it)")
    size = tuple(batch["image"].shape[-3:])
    views1, views2, coords2, voxels, starts2 = [], [], [], [], []
    for b, index in enumerate(np.asarray(batch["volume_index"]).tolist()):
        ref = refs[index]
        start2, pair = _second_view(ref, batch["start"][b], size, n_voxels, batch["mask"][b],
                                    max_shift_fraction, rng)
        view2 = scale_hu(cut_patch(ref.image(), start2, size, PAD_HU), window_hu)
        views1.append(augment_intensity(batch["image"][b, 0], rng)[None])
        views2.append(augment_intensity(view2, rng)[None])
        voxels.append(pair)
        starts2.append(start2)
        if "coords" in batch:
            coords2.append(patch_coords(ref, start2, size))
    out = dict(batch, image=np.stack(views1), image2=np.stack(views2), voxels=np.stack(voxels),
               start2=np.stack(starts2))
    if coords2:
        out["coords2"] = np.stack(coords2)
    return out


# -------------------------------------------------------------------------------------------- model side
def select_voxel_features(features: list[torch.Tensor], strides, voxels: torch.Tensor) -> torch.Tensor:
    """(B, K, sum C_i) features of K voxels per sample, every scale concatenated (vox2vec's pyramid).

    features[i]: (B, C_i, D / s_i, H / s_i, W / s_i) at stride ``strides[i]``; voxels: (B, K, 3) int64
    full-resolution indices (z, y, x); a voxel reads the coarse cell that holds it (index // stride).
    """
    batch = torch.arange(voxels.shape[0], device=voxels.device)[:, None]
    picked = []
    for feat, stride in zip(features, strides):
        z, y, x = (voxels // stride).unbind(-1)
        picked.append(feat[batch, :, z, y, x])  # advanced indices around a slice: (B, K, C_i)
    return torch.cat(picked, dim=-1)


class ProjectionHead(nn.Module):
    """vox2vec's head: (N, in_dim) -> (N, out_dim) unit vectors (Linear-BatchNorm-ReLU twice, then Linear)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(),
                                 nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(),
                                 nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x).float(), dim=-1)


class ContrastiveModel(nn.Module):
    """The backbone plus the training-only projection head; ``backbone`` is what gets exported.

    forward(x (B, 1, D, H, W), t (B,), cond or None, voxels=(B, K, 3) int64) -> (embeddings (B, K, proj_dim)
    unit vectors, out_mean): ``out_mean`` is the mean of the backbone's output volume, which the contrastive
    loss does not use; adding ``0 * out_mean`` gives the output layer a (zero) gradient, as DDP wants every
    parameter to get one. Without ``voxels`` it is the backbone (``return_features`` included), so code that
    reads features from the model being trained (the online probe) works unchanged.
    """

    def __init__(self, backbone: nn.Module, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(sum(backbone.feature_channels), proj_dim)
        self.feature_channels, self.feature_strides = backbone.feature_channels, backbone.feature_strides

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                voxels: torch.Tensor | None = None, return_features: bool = False):
        if voxels is None:
            return self.backbone(x, t, cond, return_features=return_features)
        out, features = self.backbone(x, t, cond, return_features=True)
        picked = select_voxel_features(features, self.backbone.feature_strides, voxels)
        embeddings = self.head(picked.reshape(-1, picked.shape[-1]))
        return embeddings.reshape(*voxels.shape[:2], -1), out.float().mean()


def info_nce(e1: torch.Tensor, e2: torch.Tensor, temperature: float) -> torch.Tensor:
    """vox2vec's symmetric InfoNCE of paired unit vectors e1, e2 (N, P): row k of e1 and of e2 are a positive
    pair; the other 2N - 2 vectors are its negatives. Scalar float32 loss."""
    e1, e2 = e1.float(), e2.float()
    eye = torch.eye(len(e1), dtype=torch.bool, device=e1.device)
    l11 = (e1 @ e1.T / temperature).masked_fill(eye, float("-inf"))
    l22 = (e2 @ e2.T / temperature).masked_fill(eye, float("-inf"))
    l12 = e1 @ e2.T / temperature
    positive = l12.diagonal()
    loss1 = (torch.logsumexp(torch.cat([l11, l12], dim=1), dim=1) - positive).mean()
    loss2 = (torch.logsumexp(torch.cat([l12.T, l22], dim=1), dim=1) - positive).mean()
    return (loss1 + loss2) / 2


def contrastive_loss(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, cond1: torch.Tensor | None,
                     cond2: torch.Tensor | None, voxels: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of one batch of view pairs, both views in one forward pass of ``model`` (a ContrastiveModel,
    possibly DDP-wrapped) at t = 0. x1, x2: (B, 1, D, H, W) in the model's range; cond1/2: guidance or
    None; voxels: (B, 2, K, 3) int64 (view 1, view 2)."""
    b = x1.shape[0]
    x = torch.cat([x1, x2])
    cond = None if cond1 is None else torch.cat([cond1, cond2])
    t = torch.zeros(2 * b, dtype=torch.long, device=x.device)
    embeddings, out_mean = model(x, t, cond, torch.cat([voxels[:, 0], voxels[:, 1]]))
    p = embeddings.shape[-1]
    return info_nce(embeddings[:b].reshape(-1, p), embeddings[b:].reshape(-1, p), temperature) + 0.0 * out_mean
