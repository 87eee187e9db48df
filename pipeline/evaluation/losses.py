"""The segmentation losses of the downstream protocols and thresholded labels.

``segmentation_loss`` picks the configured one (``EvaluateConfig.loss``): per-class BCE + soft Dice (vox2vec),
or Dice + CE (nnU-Net). Both read 13 organ logits (B, K, D, H, W) (channel k = BTCV label k + 1, background
implicit) so every head and ``predict_labels`` serve both. ``dice_ce`` treats the logits as a softmax over
(background = logit 0, organs): its argmax equals ``predict_labels(sigmoid(logits), 0.5)``, so training and
thresholded inference agree. (The pretraining objectives are ``PretrainConfig.objective``; the diffusion one is
``pipeline/diffusion/objective.py``.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def one_hot_organs(label_zyx_long: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, D, H, W) integer labels (0 background, 1..K) -> (B, K, D, H, W) float {0, 1}; channel k = label k+1.

    Background has no channel.
    """
    if label_zyx_long.dtype.is_floating_point or label_zyx_long.dtype == torch.bool:
        raise ValueError(f"label_zyx_long must be an integer tensor, got dtype {label_zyx_long.dtype}")
    classes = torch.arange(1, num_classes + 1, device=label_zyx_long.device).view(1, -1, 1, 1, 1)
    return (label_zyx_long.unsqueeze(1) == classes).float()


def masked_bce_with_logits(logits: torch.Tensor, target: torch.Tensor,
                           body_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-class BCE-with-logits over the voxels where ``body_mask`` (B, D, H, W) bool (or 0/1) is set.

    logits, target: (B, K, D, H, W) float. Without a mask: mean over every voxel and class. Returns 0-d tensor;
    voxels outside the mask get neither loss nor gradient. An all-False mask gives 0.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if body_mask is None:
        return bce.mean()
    weight = body_mask.unsqueeze(1).to(bce.dtype).expand_as(bce)
    return (bce * weight).sum() / weight.sum().clamp_min(1.0)


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of soft Dice, sums taken over batch and space ("batch Dice").

    probs, target: (B, K, D, H, W) float in [0, 1]. ``smooth`` (voxels) keeps a class absent from the batch
    from dominating: its loss is sum(p) / (sum(p) + smooth), 0 when nothing is predicted. Returns 0-d tensor.
    """
    dims = (0, 2, 3, 4)
    intersection = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (total + smooth)).mean()


def bce_dice_loss(logits: torch.Tensor, label_zyx_long: torch.Tensor,
                  body_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class BCE-with-logits (masked to the body) + soft Dice (whole patch) over K sigmoid channels.

    logits: (B, K, D, H, W) float; label_zyx_long: (B, D, H, W) int labels 0..K; body_mask: (B, D, H, W)
    bool (or 0/1 integers) or None. Targets are one-hot without background. The Dice term is not masked:
    it keeps organ predictions out of air and table too. Returns a 0-d tensor.
    """
    if logits.ndim != 5 or label_zyx_long.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits (B, K, D, H, W) {tuple(logits.shape)} and label_zyx_long (B, D, H, W) "
                         f"{tuple(label_zyx_long.shape)} do not match")
    if body_mask is not None and body_mask.shape != label_zyx_long.shape:
        raise ValueError(f"body_mask shape {tuple(body_mask.shape)} must equal the label shape "
                         f"{tuple(label_zyx_long.shape)}")
    target = one_hot_organs(label_zyx_long, logits.shape[1])
    return masked_bce_with_logits(logits, target, body_mask) + soft_dice_loss(torch.sigmoid(logits), target)


def predict_labels(probs: torch.Tensor | np.ndarray, threshold: float = 0.5) -> torch.Tensor | np.ndarray:
    """Label map from per-organ probabilities: argmax organ + 1 where its probability >= threshold, else 0.

    probs: (K, D, H, W) or (B, K, D, H, W) float in [0, 1] (sigmoid outputs, channel k = label k + 1).
    Returns the same container (torch tensor or numpy array) without the K axis, dtype uint8.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    is_numpy = isinstance(probs, np.ndarray)
    p = torch.from_numpy(probs) if is_numpy else probs
    if p.ndim not in (4, 5):
        raise ValueError(f"probs must be (K, D, H, W) or (B, K, D, H, W), got shape {tuple(p.shape)}")
    best, index = p.max(dim=-4)
    labels = torch.where(best >= threshold, index + 1, torch.zeros_like(index)).to(torch.uint8)
    return labels.numpy() if is_numpy else labels


LOSSES = ("bce_dice", "dice_ce")


def dice_ce_loss(logits: torch.Tensor, label_zyx_long: torch.Tensor,
                 body_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy over background + K organs (masked to the body) + soft Dice of the organs.

    logits: (B, K, D, H, W) float; label_zyx_long: (B, D, H, W) int labels 0..K; body_mask: (B, D, H, W) bool
    or None. Background's logit is fixed at 0. Returns a 0-d tensor.
    """
    if logits.ndim != 5 or label_zyx_long.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits (B, K, D, H, W) {tuple(logits.shape)} and label_zyx_long (B, D, H, W) "
                         f"{tuple(label_zyx_long.shape)} do not match")
    full = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
    ce = F.cross_entropy(full, label_zyx_long.long(), reduction="none")
    if body_mask is not None:
        weight = body_mask.to(ce.dtype)
        ce = (ce * weight).sum() / weight.sum().clamp_min(1.0)
    else:
        ce = ce.mean()
    probs = torch.softmax(full, dim=1)[:, 1:]
    return ce + soft_dice_loss(probs, one_hot_organs(label_zyx_long, logits.shape[1]))


def segmentation_loss(kind: str, logits: torch.Tensor, label_zyx_long: torch.Tensor,
                      body_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``bce_dice_loss`` (kind "bce_dice", vox2vec) or ``dice_ce_loss`` (kind "dice_ce", nnU-Net)."""
    if kind == "bce_dice":
        return bce_dice_loss(logits, label_zyx_long, body_mask)
    if kind == "dice_ce":
        return dice_ce_loss(logits, label_zyx_long, body_mask)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
