"""Downstream segmentation on frozen features: feature extraction, head training, whole-volume prediction.

Pure torch (no Ray, no MLflow): ``pipeline.distributed.evaluate`` runs it on Ray and logs the results.
Features follow DDPM-seg (Baranchuk et al. 2022): the input is noised to a small timestep t with a fixed
noise draw, the denoiser runs with the guide's coordinates, and its multi-scale decoder activations are
taken (several timesteps are concatenated per scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import EvaluateConfig, PretrainConfig
from pipeline.data.patches import PatchStream, VolumeRef, patch_coords, scale_hu
from pipeline.diffusion.objective import to_model_range
from pipeline.diffusion.schedules import DiffusionSchedule, q_sample
from pipeline.evaluation.heads import build_head
from pipeline.evaluation.losses import bce_dice_loss, predict_labels
from pipeline.evaluation.metrics import dice_per_organ
from pipeline.evaluation.sliding import sliding_window_predict
from pipeline.train.step import guidance_cond


class FrozenFeatures(nn.Module):
    """Multi-scale features of a frozen backbone for inputs packed as channels (image, coords, noise).

    forward(packed (B, 4 + 1, D, H, W)) -> list of (B, C_i * n_timesteps, D/s_i, H/s_i, W/s_i), coarsest
    first. Packing the noise with the image makes sliding windows see the same noise as the whole volume.
    """

    def __init__(self, backbone: nn.Module, pretrain_cfg: PretrainConfig, timesteps: tuple[int, ...]):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.cfg = pretrain_cfg
        self.noised = pretrain_cfg.objective == "diffusion" or pretrain_cfg.objective == "none"
        self.timesteps = timesteps if self.noised else (0,)
        self.schedule = DiffusionSchedule.from_config(pretrain_cfg.diffusion)
        self.feature_channels = tuple(c * len(self.timesteps) for c in backbone.feature_channels)
        self.feature_strides = tuple(backbone.feature_strides)

    @torch.no_grad()
    def forward(self, packed: torch.Tensor) -> list[torch.Tensor]:
        image, coords, noise = packed[:, :1], packed[:, 1:4], packed[:, 4:5]
        x0 = to_model_range(image)
        cond = guidance_cond(self.cfg.model, coords)
        per_t = []
        for t in self.timesteps:
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
            x_t = q_sample(x0, tt, noise, self.schedule.to(x0.device)) if self.noised and t > 0 else x0
            _, feats = self.backbone(x_t, tt, cond, return_features=True)
            per_t.append(feats)
        return [torch.cat(level, dim=1) for level in zip(*per_t)]


def pack_batch(batch: dict[str, np.ndarray], generator: torch.Generator) -> torch.Tensor:
    """(B, 5, D, H, W): image [0, 1], body-box coords (3), standard normal noise."""
    image = torch.from_numpy(batch["image"])
    coords = torch.from_numpy(batch["coords"])
    noise = torch.randn(image.shape, generator=generator)
    return torch.cat([image, coords, noise], dim=1)


def pack_volume(ref: VolumeRef, window_hu, seed: int) -> torch.Tensor:
    """The whole volume packed like ``pack_batch``: (1, 5, D, H, W)."""
    shape = ref.shape_zyx
    image = torch.from_numpy(scale_hu(np.asarray(ref.image()), window_hu))[None, None]
    coords = torch.from_numpy(patch_coords(ref, (0, 0, 0), shape))[None]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    return torch.cat([image, coords, noise], dim=1)


@dataclass
class HeadResult:
    head: nn.Module
    losses: list[float]


def train_head(features: FrozenFeatures, refs: list[VolumeRef], cfg: EvaluateConfig,
               patch_size_zyx, window_hu) -> HeadResult:
    """Train the probe head on random (organ-centred half of the time) patches of the training volumes."""
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.protocol, features.feature_channels, hidden=cfg.head_hidden,
                      feature_strides=features.feature_strides)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)
    stream = PatchStream(refs, patch_size_zyx, window_hu, seed=cfg.seed + 1, foreground_prob=0.5)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.head_steps):
        batch = stream.batch(step, cfg.head_batch_size)
        packed = pack_batch(batch, generator)
        logits = head(features(packed), packed.shape[2:])
        loss = bce_dice_loss(logits, torch.from_numpy(batch["label"]), torch.from_numpy(batch["mask"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return HeadResult(head=head.eval(), losses=losses)


@torch.no_grad()
def predict_volume(features: FrozenFeatures, head: nn.Module, ref: VolumeRef, window_zyx, window_hu,
                   overlap: float, seed: int) -> np.ndarray:
    """Label map (D, H, W) uint8 of a whole volume by sliding windows; outside the body is background."""
    packed = pack_volume(ref, window_hu, seed)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(head(features(patch), patch.shape[2:]))

    probs = sliding_window_predict(packed, predictor, window_zyx, overlap=overlap, batch_size=2)
    pred = predict_labels(probs[0].numpy())
    mask = ref.mask()
    if mask is not None:
        pred = np.where(np.asarray(mask) > 0, pred, 0).astype(np.uint8)
    return pred


def evaluate_backbone(backbone: nn.Module, pretrain_cfg: PretrainConfig, cfg: EvaluateConfig,
                      train_refs: list[VolumeRef], test_refs: list[VolumeRef]) -> dict:
    """Train a head on ``train_refs``, predict ``test_refs``: per-case Dice (13,), predictions, losses."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    patch = cfg.patch_size_zyx or pretrain_cfg.patches.patch_size_zyx
    window_hu = pretrain_cfg.patches.window_hu
    features = FrozenFeatures(backbone, pretrain_cfg, cfg.feature_timesteps)
    result = train_head(features, train_refs, cfg, patch, window_hu)
    per_case, preds = {}, {}
    for ref in test_refs:
        pred = predict_volume(features, result.head, ref, patch, window_hu, cfg.sw_overlap, cfg.seed)
        per_case[ref.item_id] = dice_per_organ(pred, np.asarray(ref.label()))
        preds[ref.item_id] = pred
    return {"dice": per_case, "pred": preds, "losses": result.losses}
