"""Downstream segmentation: head (or whole-network) training, whole-volume prediction, Dice.

Protocols (``EvaluateConfig.protocol``):
- ``linear`` / ``nonlinear``: a head on FROZEN features. The backbone runs once over sampled windows of the
  training volumes (``features.build_bank``); the head then trains on the stored per-voxel features.
- ``finetune``: the head and the backbone train together on patches (``train_network``, backbone learning
  rate ``lr x backbone_lr_scale``).
The supervised ceiling is ``train_network`` on a randomly initialised backbone (``EvaluateConfig.ceiling``).
Every training validates on whole volumes (sliding windows) every ``val_every`` steps, keeps the best
weights, and may stop at a wall-clock limit. Pure torch (no Ray, no MLflow).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import EvaluateConfig, NetworkTrainConfig, PretrainConfig
from pipeline.data.augment import augment_batch, context_size
from pipeline.data.patches import PatchStream, VolumeRef
from pipeline.data.sliding import sliding_window_predict
from pipeline.evaluation.features import BackboneFeatures, BankSpec, build_bank, pack_batch, pack_volume
from pipeline.evaluation.heads import build_head
from pipeline.evaluation.losses import predict_labels, segmentation_loss
from pipeline.evaluation.postprocess import remove_islands
from pipeline.evaluation.metrics import dice_mean, dice_per_organ
from pipeline.evaluation.surface import hd95_per_organ
from pipeline.train.step import warmup_cosine_lr

#: progress callback: (step, total steps, loss, seconds so far)
Progress = Callable[[int, int, float, float], None]


@dataclass
class HeadResult:
    head: nn.Module
    losses: list[float]
    val_dice: list[tuple[int, float]] = field(default_factory=list)  # (step, mean Dice over val volumes)
    best_step: int | None = None
    steps_done: int = 0
    stopped_at_limit: bool = False


class _Best:
    """Validation Dice checks; keeps a copy of the weights of the best one."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules, self.score, self.state, self.step = modules, -np.inf, None, None

    def offer(self, step: int, score: float) -> None:
        if not np.isnan(score) and score > self.score:
            self.score, self.step = score, step
            self.state = {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()}

    def restore(self) -> None:
        if self.state is not None:
            for k, m in self.modules.items():
                m.load_state_dict(self.state[k])


def _check_due(step: int, total: int, every: int, stop: bool) -> bool:
    done = step + 1
    return stop or done == total or bool(every and done % every == 0)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def bank_spec(cfg: EvaluateConfig, patch_size_zyx, window_hu) -> BankSpec:
    """The feature-bank settings of the frozen-head protocols (``cfg.head``)."""
    hc = cfg.head
    return BankSpec(tuple(patch_size_zyx), tuple(window_hu), hc.windows_per_volume, hc.voxels_per_window,
                    hc.voxels_per_organ, hc.foreground_prob, hc.jitter, cfg.seed + 1)


def train_frozen_head(features: BackboneFeatures, refs: list[VolumeRef], cfg: EvaluateConfig, patch_size_zyx,
                      window_hu, val_refs: list[VolumeRef] | None = None,
                      progress: Progress | None = None) -> HeadResult:
    """The ``cfg.protocol`` head ("linear" | "nonlinear") on frozen features of ``refs`` (a feature bank),
    loss ``cfg.loss`` on batches of voxel vectors; with ``val_refs``, whole-volume validation Dice every
    ``cfg.head.val_every`` steps and the best head kept."""
    hc = cfg.head
    torch.manual_seed(cfg.seed)
    device = next(features.backbone.parameters()).device
    spec = bank_spec(cfg, patch_size_zyx, window_hu)
    bank = build_bank(features, refs, spec, cfg.bank_cache)
    head = build_head(cfg.protocol, features.feature_channels, hidden=hc.hidden,
                      feature_strides=features.feature_strides).to(device)
    mean, std = bank.channel_stats()
    head.fuse.set_input_stats(mean.to(device), std.to(device))
    optimizer = torch.optim.AdamW(head.parameters(), lr=hc.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(cfg.seed)
    result, best, t0 = HeadResult(head=head, losses=[]), _Best({"head": head}), time.perf_counter()
    for step in range(hc.steps):
        _set_lr(optimizer, warmup_cosine_lr(step, hc.steps, min(100, hc.steps // 10), hc.lr))
        x, y = bank.batch(hc.batch_voxels, generator)
        logits = head.forward_voxels(x.to(device))
        loss = segmentation_loss(cfg.loss, logits.T.reshape(1, logits.shape[1], -1, 1, 1),
                                 y.to(device).view(1, -1, 1, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, hc.steps, result.losses[-1], time.perf_counter() - t0)
        if val_refs and _check_due(step, hc.steps, hc.val_every, False):
            score = validation_dice(features, head, val_refs, patch_size_zyx, window_hu, cfg.sw_overlap, cfg.seed,
                                    cfg.island_fraction)
            result.val_dice.append((step + 1, score))
            best.offer(step + 1, score)
    best.restore()
    result.best_step, result.steps_done = best.step, hc.steps
    result.head = head.eval()
    return result


def network_optimizer(features: BackboneFeatures, head: nn.Module, tc: NetworkTrainConfig) -> torch.optim.Optimizer:
    """AdamW over the head (lr) and the backbone (lr x ``tc.backbone_lr_scale``); ``_set_lr`` keeps the ratio."""
    groups = [{"params": list(head.parameters()), "lr_scale": 1.0}]
    if features.trainable:
        groups.append({"params": list(features.backbone.parameters()), "lr_scale": tc.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=1e-4)
    _set_lr(optimizer, tc.lr)
    return optimizer


def train_network(features: BackboneFeatures, refs: list[VolumeRef], cfg: EvaluateConfig, tc: NetworkTrainConfig,
                  patch_size_zyx, window_hu, val_refs: list[VolumeRef] | None = None,
                  progress: Progress | None = None) -> HeadResult:
    """Head ``tc.head`` and the (trainable) backbone together on random patches of ``refs`` (organ-centred
    with probability ``tc.foreground_prob``, organ drawn uniformly among those present), loss ``cfg.loss``
    masked to the body, AdamW with warm-up and cosine decay; stops at ``tc.max_seconds``; validation and
    best weights as ``train_frozen_head``."""
    torch.manual_seed(cfg.seed)
    device = next(features.backbone.parameters()).device
    head = build_head(tc.head, features.feature_channels, hidden=cfg.head.hidden,
                      feature_strides=features.feature_strides).to(device)
    cut, jitter = tuple(patch_size_zyx), tc.jitter
    if tc.augment is not None:  # cut larger patches, resample each to the patch size (jitter: at most as many voxels)
        cut = context_size(patch_size_zyx, tc.augment)
        jitter = tc.jitter * min(p / c for p, c in zip(patch_size_zyx, cut))
    stream = PatchStream(refs, cut, window_hu, seed=cfg.seed + 1, foreground_prob=tc.foreground_prob,
                         jitter=jitter)
    optimizer = network_optimizer(features, head, tc)
    generator = torch.Generator().manual_seed(cfg.seed)
    result = HeadResult(head=head, losses=[])
    best, t0 = _Best({"head": head, "backbone": features.backbone}), time.perf_counter()
    for step in range(tc.steps):
        _set_lr(optimizer, warmup_cosine_lr(step, tc.steps, tc.warmup_steps, tc.lr))
        batch = stream.batch(step, tc.batch_size)
        if tc.augment is not None:
            batch = augment_batch(batch, patch_size_zyx, tc.augment, np.random.default_rng([cfg.seed, 17, step]))
        packed = pack_batch(batch, generator).to(device)
        logits = head(features(packed), packed.shape[2:])
        loss = segmentation_loss(cfg.loss, logits, torch.from_numpy(batch["label"]).to(device),
                                 torch.from_numpy(batch["mask"]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t0
        stop = tc.max_seconds is not None and elapsed >= tc.max_seconds
        if progress is not None:
            progress(step + 1, tc.steps, result.losses[-1], elapsed)
        if val_refs and _check_due(step, tc.steps, tc.val_every, stop):
            score = validation_dice(features, head, val_refs, patch_size_zyx, window_hu, cfg.sw_overlap, cfg.seed,
                                    cfg.island_fraction)
            result.val_dice.append((step + 1, score))
            best.offer(step + 1, score)
        if stop:
            result.stopped_at_limit = True
            break
    best.restore()
    result.best_step, result.steps_done = best.step, len(result.losses)
    result.head = head.eval()
    return result


def validation_dice(features: BackboneFeatures, head: nn.Module, refs: list[VolumeRef], window_zyx, window_hu,
                    overlap: float, seed: int, island_fraction: float = 0.0) -> float:
    """Mean over ``refs`` of each volume's mean Dice over organs (whole-volume sliding-window prediction,
    then ``remove_islands``, as the test cases)."""
    head.eval()
    values = [dice_mean(dice_per_organ(predict_volume(features, head, r, window_zyx, window_hu, overlap, seed,
                                                      island_fraction),
                                       np.asarray(r.label()))) for r in refs]
    head.train()
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


@torch.no_grad()
def predict_volume(features: BackboneFeatures, head: nn.Module, ref: VolumeRef, window_zyx, window_hu,
                   overlap: float, seed: int, island_fraction: float = 0.0) -> np.ndarray:
    """Label map (D, H, W) uint8 of a whole volume by sliding windows; outside the body is background; then
    each organ's islands below ``island_fraction`` of its largest component removed
    (``pipeline.evaluation.postprocess``; 0: none)."""
    device = next(head.parameters()).device
    packed = pack_volume(ref, window_hu, seed).to(device)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(head(features(patch), patch.shape[2:]))

    probs = sliding_window_predict(packed, predictor, window_zyx, overlap=overlap, batch_size=2)
    pred = predict_labels(probs[0].float().cpu().numpy())
    mask = ref.mask()
    if mask is not None:
        pred = np.where(np.asarray(mask) > 0, pred, 0).astype(np.uint8)
    return remove_islands(pred, island_fraction)


VARIANTS = ("pretrained", "random_init", "ceiling")


def fit_protocol(backbone: nn.Module, pretrain_cfg: PretrainConfig, cfg: EvaluateConfig,
                 train_refs: list[VolumeRef], val_refs: list[VolumeRef] | None = None,
                 device: str | torch.device = "cpu", variant: str = "pretrained",
                 progress: Progress | None = None) -> tuple[HeadResult, BackboneFeatures]:
    """Train what ``variant`` asks for on ``train_refs``: "pretrained" / "random_init" run ``cfg.protocol`` on
    ``backbone``; "ceiling" trains ``backbone`` (randomly initialised by the caller) and a head with all weights
    (``cfg.ceiling``). Returns the training result (head, losses, validation) and the backbone's features."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    patch = cfg.patch_size_zyx or pretrain_cfg.patches.patch_size_zyx
    window_hu = pretrain_cfg.patches.window_hu
    trains_backbone = variant == "ceiling" or cfg.protocol == "finetune"
    features = BackboneFeatures(backbone.to(device), pretrain_cfg, cfg.feature_timesteps, trainable=trains_backbone)
    if variant == "ceiling":
        if cfg.ceiling is None:
            raise ValueError("variant 'ceiling' needs EvaluateConfig.ceiling (its training settings)")
        result = train_network(features, train_refs, cfg, cfg.ceiling, patch, window_hu, val_refs, progress)
    elif cfg.protocol == "finetune":
        result = train_network(features, train_refs, cfg, cfg.finetune, patch, window_hu, val_refs, progress)
    else:
        result = train_frozen_head(features, train_refs, cfg, patch, window_hu, val_refs, progress)
    return result, features


def head_kind(cfg: EvaluateConfig, variant: str = "pretrained") -> str:
    """The head architecture ``fit_protocol`` trains for ``variant``."""
    if variant == "ceiling":
        return cfg.ceiling.head
    return cfg.finetune.head if cfg.protocol == "finetune" else cfg.protocol


def evaluate_backbone(backbone: nn.Module, pretrain_cfg: PretrainConfig, cfg: EvaluateConfig,
                      train_refs: list[VolumeRef], test_refs: list[VolumeRef],
                      val_refs: list[VolumeRef] | None = None, device: str | torch.device = "cpu",
                      variant: str = "pretrained", progress: Progress | None = None) -> dict:
    """``fit_protocol`` on ``train_refs`` (validating on ``val_refs``), then predict ``test_refs`` whole.

    Returns ``dice``: case -> (13,) Dice, ``pred``: case -> (D, H, W) uint8, ``losses``, ``val_dice``
    [(step, Dice)], ``best_step``, ``steps``, ``hd95``: case -> (13,) mm (when ``cfg.hd95``), ``seconds``.
    """
    t0 = time.perf_counter()
    result, features = fit_protocol(backbone, pretrain_cfg, cfg, train_refs, val_refs, device, variant, progress)
    patch = cfg.patch_size_zyx or pretrain_cfg.patches.patch_size_zyx
    per_case, preds, hd95 = {}, {}, {}
    for ref in test_refs:
        pred = predict_volume(features, result.head, ref, patch, pretrain_cfg.patches.window_hu,
                              cfg.sw_overlap, cfg.seed, cfg.island_fraction)
        label = np.asarray(ref.label())
        per_case[ref.item_id] = dice_per_organ(pred, label)
        preds[ref.item_id] = pred
        if cfg.hd95:
            hd95[ref.item_id] = hd95_per_organ(pred, label, ref.spacing_zyx_mm)
    return {"dice": per_case, "pred": preds, "losses": result.losses, "val_dice": result.val_dice,
            "best_step": result.best_step, "steps": result.steps_done, "hd95": hd95,
            "seconds": time.perf_counter() - t0}
