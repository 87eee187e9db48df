"""Online probe: how useful are a backbone's features right now? (vox2vec-style online evaluation)

A linear head is fitted on frozen features of a few labelled training volumes (a small feature bank) and
scored by whole-volume Dice on a few others. Cheap enough to run every few hundred pretraining steps, so a
user sees during pretraining whether the features improve. Pure torch.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from pipeline.config import EvaluateConfig, FrozenHeadConfig, PretrainConfig, ProbeConfig
from pipeline.data.patches import VolumeRef, in_content_order
from pipeline.evaluation.downstream import predict_volume, train_frozen_head
from pipeline.evaluation.features import BackboneFeatures
from pipeline.evaluation.metrics import dice_per_organ


def split_probe_refs(refs: list[VolumeRef], cfg: ProbeConfig) -> tuple[list[VolumeRef], list[VolumeRef]]:
    """(fit, score) volumes of the probe: the first ``cfg.fit_cases`` and the next ``cfg.score_cases`` of
    ``refs`` in content order (``in_content_order``: the same cases whenever the folder is preprocessed again;
    patients are not mixed up here: give the probe a folder whose items are distinct patients)."""
    refs = in_content_order(refs)
    need = cfg.fit_cases + cfg.score_cases
    if len(refs) < need:
        raise ValueError(f"probe.data holds {len(refs)} labelled volumes; fit_cases + score_cases = {need}")
    return refs[:cfg.fit_cases], refs[cfg.fit_cases:need]


@torch.no_grad()
def _score(features: BackboneFeatures, head: nn.Module, refs: list[VolumeRef], patch, window_hu,
           seed: int) -> np.ndarray:
    return np.nanmean([dice_per_organ(predict_volume(features, head, r, patch, window_hu, 0.25, seed),
                                      np.asarray(r.label())) for r in refs], axis=0)


def probe_dice(backbone: nn.Module, pretrain_cfg: PretrainConfig, cfg: ProbeConfig, fit_refs: list[VolumeRef],
               score_refs: list[VolumeRef], seed: int = 0) -> dict[str, float]:
    """Fit a linear head on frozen features of ``fit_refs`` (timestep ``cfg.timestep``), score ``score_refs``.

    ``backbone`` is used as is (e.g. the EMA weights) and left unchanged. Returns ``probe_dice_mean`` (mean over
    organs present, NaN-aware), ``probe_dice_<organ>``-free summary keys and ``probe_seconds``.
    """
    t0 = time.perf_counter()
    was_training = backbone.training
    features = BackboneFeatures(backbone, pretrain_cfg, (cfg.timestep,), trainable=False)
    ecfg = EvaluateConfig(data="probe", protocol="linear", seed=seed, head=FrozenHeadConfig(
        windows_per_volume=cfg.windows_per_volume, steps=cfg.head_steps, val_every=0))
    patch = pretrain_cfg.patches.patch_size_zyx
    head = train_frozen_head(features, fit_refs, ecfg, patch, pretrain_cfg.patches.window_hu).head
    per_organ = _score(features, head, score_refs, patch, pretrain_cfg.patches.window_hu, seed)
    backbone.train(was_training)
    mean = float(np.nanmean(per_organ)) if not np.all(np.isnan(per_organ)) else float("nan")
    return {"probe_dice_mean": mean, "probe_organs_found": float(np.sum(per_organ > 0.2)),
            "probe_seconds": time.perf_counter() - t0}
