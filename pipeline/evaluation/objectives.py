"""The configurable segmentation loss of the downstream protocols: BCE + soft Dice, or Dice + CE.

Both read 13 organ logits (B, K, D, H, W) (channel k = BTCV label k + 1, background implicit) so every head and
``predict_labels`` serve both. ``dice_ce`` treats the logits as a softmax over (background = logit 0, organs):
its argmax equals ``predict_labels(sigmoid(logits), 0.5)``, so training and thresholded inference agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.evaluation.losses import bce_dice_loss, one_hot_organs, soft_dice_loss

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
