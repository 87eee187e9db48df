"""Downstream segmentation: feature extraction, head (or whole-network) training, whole-volume prediction.

Protocols (``EvaluateConfig.protocol``): ``linear`` and ``nonlinear`` heads on FROZEN features, and
``finetune``: the same features with the backbone trainable (learning rate ``head_lr x finetune_lr_scale``)
under the non-linear head. Pure torch (no Ray, no MLflow): ``pipeline.distributed.evaluate`` runs it on Ray.
Features follow DDPM-seg (Baranchuk et al. 2022): the input is noised to a small timestep t with a fixed
noise draw, the denoiser runs with the guide's coordinates, and its multi-scale decoder activations are
taken (several timesteps are concatenated per scale).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import EvaluateConfig, PretrainConfig
from pipeline.data.patches import PatchStream, VolumeRef, patch_coords, scale_hu
from pipeline.diffusion.objective import to_model_range
from pipeline.diffusion.schedules import DiffusionSchedule, q_sample
from pipeline.evaluation.heads import build_head
from pipeline.evaluation.losses import predict_labels
from pipeline.evaluation.metrics import dice_mean, dice_per_organ
from pipeline.evaluation.objectives import segmentation_loss
from pipeline.evaluation.sliding import sliding_window_predict
from pipeline.evaluation.surface import hd95_per_organ
from pipeline.train.step import guidance_cond


class BackboneFeatures(nn.Module):
    """Multi-scale features of a backbone for inputs packed as channels (image, coords, noise).

    forward(packed (B, 4 + 1, D, H, W)) -> list of (B, C_i * n_timesteps, D/s_i, H/s_i, W/s_i), coarsest
    first. Packing the noise with the image makes sliding windows see the same noise as the whole volume.
    ``trainable``: gradients flow into the backbone (finetune); else it is frozen and runs without autograd.
    The backbone stays in eval mode either way (GroupNorm, no dropout: train and eval compute the same).
    """

    def __init__(self, backbone: nn.Module, pretrain_cfg: PretrainConfig, timesteps: tuple[int, ...],
                 trainable: bool = False):
        super().__init__()
        self.trainable = trainable
        self.backbone = backbone.eval().requires_grad_(trainable)
        self.cfg = pretrain_cfg
        self.noised = pretrain_cfg.objective == "diffusion" or pretrain_cfg.objective == "none"
        self.timesteps = tuple(timesteps) if self.noised else (0,)
        self.schedule = DiffusionSchedule.from_config(pretrain_cfg.diffusion)
        self.feature_channels = tuple(c * len(self.timesteps) for c in backbone.feature_channels)
        self.feature_strides = tuple(backbone.feature_strides)

    def train(self, mode: bool = True) -> "BackboneFeatures":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, packed: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
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
    val_dice: list[tuple[int, float]] = field(default_factory=list)  # (step, mean Dice over val volumes)
    best_step: int | None = None


def _optimizer(features: BackboneFeatures, head: nn.Module, cfg: EvaluateConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(head.parameters()), "lr": cfg.head_lr}]
    if features.trainable:
        groups.append({"params": list(features.backbone.parameters()), "lr": cfg.head_lr * cfg.finetune_lr_scale})
    return torch.optim.Adam(groups)


def _state(features: BackboneFeatures, head: nn.Module) -> dict:
    out = {"head": copy.deepcopy(head.state_dict())}
    if features.trainable:
        out["backbone"] = copy.deepcopy(features.backbone.state_dict())
    return out


def validation_dice(features: BackboneFeatures, head: nn.Module, refs: list[VolumeRef], window_zyx, window_hu,
                    overlap: float, seed: int) -> float:
    """Mean over ``refs`` of each volume's mean Dice over organs (whole-volume sliding-window prediction)."""
    head.eval()
    values = [dice_mean(dice_per_organ(predict_volume(features, head, r, window_zyx, window_hu, overlap, seed),
                                       np.asarray(r.label()))) for r in refs]
    head.train()
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def train_head(features: BackboneFeatures, refs: list[VolumeRef], cfg: EvaluateConfig,
               patch_size_zyx, window_hu, val_refs: list[VolumeRef] | None = None) -> HeadResult:
    """Train the head (and the backbone when ``features.trainable``) on random patches of ``refs`` (organ-
    centred half of the time), loss ``cfg.loss`` masked to the body. With ``val_refs``: their Dice every
    ``cfg.val_every`` steps (and at the end), and the weights of the best check are restored."""
    torch.manual_seed(cfg.seed)
    device = next(features.backbone.parameters()).device
    head = build_head("nonlinear" if cfg.protocol == "finetune" else cfg.protocol, features.feature_channels,
                      hidden=cfg.head_hidden, feature_strides=features.feature_strides).to(device)
    optimizer = _optimizer(features, head, cfg)
    stream = PatchStream(refs, patch_size_zyx, window_hu, seed=cfg.seed + 1, foreground_prob=0.5)
    generator = torch.Generator().manual_seed(cfg.seed)
    result, best = HeadResult(head=head, losses=[]), (-np.inf, None)
    for step in range(cfg.head_steps):
        batch = stream.batch(step, cfg.head_batch_size)
        packed = pack_batch(batch, generator).to(device)
        logits = head(features(packed), packed.shape[2:])
        loss = segmentation_loss(cfg.loss, logits, torch.from_numpy(batch["label"]).to(device),
                                 torch.from_numpy(batch["mask"]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        done = step + 1
        if val_refs and ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.head_steps):
            score = validation_dice(features, head, val_refs, patch_size_zyx, window_hu, cfg.sw_overlap, cfg.seed)
            result.val_dice.append((done, score))
            if not np.isnan(score) and score > best[0]:
                best = (score, _state(features, head))
                result.best_step = done
    if best[1] is not None:
        head.load_state_dict(best[1]["head"])
        if "backbone" in best[1]:
            features.backbone.load_state_dict(best[1]["backbone"])
    result.head = head.eval()
    return result


@torch.no_grad()
def predict_volume(features: BackboneFeatures, head: nn.Module, ref: VolumeRef, window_zyx, window_hu,
                   overlap: float, seed: int) -> np.ndarray:
    """Label map (D, H, W) uint8 of a whole volume by sliding windows; outside the body is background."""
    device = next(head.parameters()).device
    packed = pack_volume(ref, window_hu, seed).to(device)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(head(features(patch), patch.shape[2:]))

    probs = sliding_window_predict(packed, predictor, window_zyx, overlap=overlap, batch_size=2)
    pred = predict_labels(probs[0].float().cpu().numpy())
    mask = ref.mask()
    if mask is not None:
        pred = np.where(np.asarray(mask) > 0, pred, 0).astype(np.uint8)
    return pred


def evaluate_backbone(backbone: nn.Module, pretrain_cfg: PretrainConfig, cfg: EvaluateConfig,
                      train_refs: list[VolumeRef], test_refs: list[VolumeRef],
                      val_refs: list[VolumeRef] | None = None, device: str | torch.device = "cpu") -> dict:
    """Train on ``train_refs`` (validate on ``val_refs``), predict ``test_refs`` whole, on ``device``.

    Returns ``dice``: case -> (13,) Dice, ``pred``: case -> (D, H, W) uint8, ``losses``, ``val_dice``
    [(step, Dice)], ``best_step``, ``hd95``: case -> (13,) mm (when ``cfg.hd95``), ``seconds``.
    """
    t0 = time.perf_counter()
    patch = cfg.patch_size_zyx or pretrain_cfg.patches.patch_size_zyx
    window_hu = pretrain_cfg.patches.window_hu
    features = BackboneFeatures(backbone.to(device), pretrain_cfg, cfg.feature_timesteps,
                                trainable=cfg.protocol == "finetune")
    result = train_head(features, train_refs, cfg, patch, window_hu, val_refs)
    per_case, preds, hd95 = {}, {}, {}
    for ref in test_refs:
        pred = predict_volume(features, result.head, ref, patch, window_hu, cfg.sw_overlap, cfg.seed)
        label = np.asarray(ref.label())
        per_case[ref.item_id] = dice_per_organ(pred, label)
        preds[ref.item_id] = pred
        if cfg.hd95:
            hd95[ref.item_id] = hd95_per_organ(pred, label, ref.spacing_zyx_mm)
    return {"dice": per_case, "pred": preds, "losses": result.losses, "val_dice": result.val_dice,
            "best_step": result.best_step, "hd95": hd95, "seconds": time.perf_counter() - t0}
