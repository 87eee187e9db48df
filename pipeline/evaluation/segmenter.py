"""A trained segmenter as one object and one folder: backbone, head, guide and preprocessing conventions.

``Segmenter`` works on the preprocessing grid (canonical LPS, resampled to ``spacing_zyx_mm``, int16 HU, the
body-box crop of ``anatdiff preprocess``): ``predict_probs`` gives (14, Z, Y, X) class probabilities
(channel 0 = background), ``forward`` the uint8 label map (each organ's islands removed as ``island_fraction``
says). ``anatdiff predict`` brings them back onto a scan's original grid (pipeline/predict).

Folder format (``save_segmenter`` / ``load_segmenter``), loadable without unpickling code:
``segmenter.json`` (format, conventions, the pretrain config, head settings, label names, model card) and
``weights.pt`` (state dicts only, read with ``torch.load(weights_only=True)``), plus ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import PretrainConfig, UserError
from pipeline.data.inputs import PAD_HU, body_bbox_zyx, scale_hu
from pipeline.evaluation.features import BackboneFeatures
from pipeline.evaluation.heads import build_head
from pipeline.evaluation.postprocess import remove_islands
from pipeline.data.sliding import sliding_window_predict
from pipeline.data.conditioning import bodybox_coords
from pipeline.labels import ORGANS

SEGMENTER_FORMAT = "anatdiff.segmenter/1"
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "segmenter.json", "weights.pt", "MODEL_CARD.md"


class Segmenter(nn.Module):
    """Backbone features -> head, with the conventions needed to run on new volumes.

    spacing_zyx_mm, body_threshold_hu: the preprocessing grid and body-mask rule of the training data.
    guide: the coordinate guide for ``guidance: learned`` backbones (else None: body-box coordinates).
    island_fraction: label maps lose each organ's islands below this fraction of its largest component
    (``pipeline.evaluation.postprocess``; ``forward`` and ``anatdiff predict`` apply it; 0: none, as folders
    saved before it existed load).
    """

    def __init__(self, backbone: nn.Module, pretrain_cfg: PretrainConfig, head: nn.Module, head_kind: str,
                 head_hidden: int, timesteps: tuple[int, ...], patch_size_zyx, spacing_zyx_mm,
                 body_threshold_hu: float = -500.0, overlap: float = 0.25, guide: nn.Module | None = None,
                 seed: int = 0, card: dict[str, Any] | None = None, island_fraction: float = 0.0):
        super().__init__()
        self.features = BackboneFeatures(backbone, pretrain_cfg, timesteps, trainable=False)
        self.head = head.eval()
        self.guide = guide.eval() if guide is not None else None
        self.pretrain_cfg = pretrain_cfg
        self.head_kind, self.head_hidden, self.timesteps = head_kind, int(head_hidden), tuple(timesteps)
        self.patch_size_zyx = tuple(int(s) for s in patch_size_zyx)
        self.spacing_zyx_mm = tuple(float(s) for s in spacing_zyx_mm)
        self.body_threshold_hu, self.overlap, self.seed = float(body_threshold_hu), float(overlap), int(seed)
        self.label_names = ORGANS
        self.card = dict(card or {})
        if not 0.0 <= island_fraction <= 1.0:
            raise ValueError(f"island_fraction must be in [0, 1], got {island_fraction}")
        self.island_fraction = float(island_fraction)

    @property
    def window_hu(self) -> tuple[float, float]:
        return tuple(self.pretrain_cfg.patches.window_hu)

    def coordinates(self, volume_hu_zyx: np.ndarray, mask_zyx: np.ndarray) -> np.ndarray:
        """(3, Z, Y, X) float32 guide coordinates: the learned guide's, else the body box's."""
        if self.pretrain_cfg.model.guidance == "learned":
            if self.guide is None:
                raise UserError("this segmenter's backbone was guided by a learned guide, but it holds none")
            from pipeline.guide.inference import predict_coords

            return predict_coords(self.guide, volume_hu_zyx).astype(np.float32)
        return bodybox_coords(volume_hu_zyx.shape, body_bbox_zyx(mask_zyx), (0, 0, 0))

    @torch.no_grad()
    def predict_probs(self, volume_hu_zyx: np.ndarray, mask_zyx: np.ndarray | None = None) -> np.ndarray:
        """(14, Z, Y, X) float32 class probabilities (channel 0 background; 1 outside the body mask) of a
        (Z, Y, X) HU volume on ``spacing_zyx_mm``; ``mask_zyx`` (bool) defaults to ``body_mask``."""
        volume = np.asarray(volume_hu_zyx)
        if volume.ndim != 3:
            raise ValueError(f"volume_hu_zyx must be (Z, Y, X), got shape {volume.shape}")
        if mask_zyx is None:
            from pipeline.ingest.body import body_mask

            mask_zyx = body_mask(volume, self.body_threshold_hu, spacing_zyx_mm=self.spacing_zyx_mm)
        mask = np.asarray(mask_zyx, dtype=bool)
        device = next(self.head.parameters()).device
        image = torch.from_numpy(scale_hu(volume, self.window_hu))[None, None]
        coords = torch.from_numpy(self.coordinates(volume, mask))[None]
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(self.seed))
        packed = torch.cat([image, coords, noise], dim=1).to(device)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            logits = self.head(self.features(patch), patch.shape[2:])
            return torch.softmax(torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1), dim=1)

        pad = float(scale_hu(np.array(PAD_HU), self.window_hu))
        probs = sliding_window_predict(packed, predictor, self.patch_size_zyx, overlap=self.overlap,
                                       batch_size=2, pad_value=pad)[0].float().cpu().numpy()
        probs[:, ~mask] = 0.0
        probs[0, ~mask] = 1.0
        return probs

    def forward(self, volume_hu: torch.Tensor) -> torch.Tensor:
        """(Z, Y, X) or (1, 1, Z, Y, X) HU tensor on the model grid -> (Z, Y, X) uint8 BTCV label map."""
        volume = volume_hu.detach().cpu().numpy().reshape(volume_hu.shape[-3:])
        labels = self.predict_probs(volume).argmax(0).astype(np.uint8)
        return torch.from_numpy(remove_islands(labels, self.island_fraction))


def _config(seg: Segmenter) -> dict[str, Any]:
    return {"format": SEGMENTER_FORMAT, "pretrain_config": seg.pretrain_cfg.model_dump(mode="json"),
            "head_kind": seg.head_kind, "head_hidden": seg.head_hidden, "timesteps": list(seg.timesteps),
            "patch_size_zyx": list(seg.patch_size_zyx), "spacing_zyx_mm": list(seg.spacing_zyx_mm),
            "orientation": "LPS (canonical), arrays (z, y, x)", "window_hu": list(seg.window_hu),
            "body_threshold_hu": seg.body_threshold_hu, "overlap": seg.overlap, "seed": seg.seed,
            "island_fraction": seg.island_fraction,
            "label_names": list(seg.label_names), "guide_config": seg.guide.config() if seg.guide else None,
            "card": seg.card}


def model_card(seg: Segmenter) -> str:
    """Markdown model card: what it segments, on which grid, trained on what, measured how, for what use."""
    card = seg.card
    lines = ["# anatdiff segmenter", "",
             "**Intended use: research only. Not a medical device; not for clinical decisions.**", "",
             f"- Segments the 13 BTCV organs: {', '.join(seg.label_names)} (label k + 1 = organ k).",
             f"- Input: CT in Hounsfield units, canonical LPS orientation, resampled to "
             f"{' x '.join(f'{s:g}' for s in seg.spacing_zyx_mm)} mm (z, y, x); `anatdiff predict` does this "
             "and writes label maps on the scan's own grid.",
             f"- Backbone: {seg.pretrain_cfg.objective} pretraining, guidance {seg.pretrain_cfg.model.guidance}, "
             f"channels {list(seg.pretrain_cfg.model.channels)}; head: {seg.head_kind}; features at t = "
             f"{list(seg.timesteps)}; window {list(seg.window_hu)} HU; patches {list(seg.patch_size_zyx)}.",
             f"- Post-processing: each organ's 26-connected components below {seg.island_fraction:g} of its largest "
             "are removed (0: none)."]
    for key in ("training_data", "protocol", "metrics", "pretrain_run_id", "notes"):
        if key in card:
            lines.append(f"- {key.replace('_', ' ').capitalize()}: {card[key]}")
    return "\n".join(lines) + "\n"


def save_segmenter(folder: str | Path, seg: Segmenter) -> Path:
    """Write ``segmenter.json``, ``weights.pt`` and ``MODEL_CARD.md`` into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"backbone": seg.features.backbone.state_dict(), "head": seg.head.state_dict(),
               "guide": seg.guide.state_dict() if seg.guide is not None else None}
    torch.save(weights, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(_config(seg), indent=1))
    (folder / CARD_FILE).write_text(model_card(seg))
    return folder


def find_segmenter_folder(folder: str | Path) -> Path:
    """The folder holding ``segmenter.json``: ``folder`` itself or a folder below it (an MLflow model keeps
    it under ``extra_files/``)."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return folder
    found = sorted(folder.rglob(CONFIG_FILE)) if folder.is_dir() else []
    if not found:
        raise UserError(f"'{folder}' holds no {CONFIG_FILE}: not an anatdiff segmenter (train one with "
                        "`anatdiff train-segmenter`)")
    return found[0].parent


def load_segmenter(folder: str | Path) -> Segmenter:
    """Rebuild a ``Segmenter`` from its folder (weights loaded with ``weights_only=True``), eval mode, CPU."""
    from pipeline.guide.model import CoordinateGuide
    from pipeline.train.step import build_model

    folder = find_segmenter_folder(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != SEGMENTER_FORMAT:
        raise UserError(f"'{folder / CONFIG_FILE}' has format {config.get('format')!r}, expected "
                        f"{SEGMENTER_FORMAT!r}")
    weights = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    pretrain_cfg = PretrainConfig.model_validate(config["pretrain_config"])
    backbone = build_model(pretrain_cfg.model)
    backbone.load_state_dict(weights["backbone"])
    n_t = len(config["timesteps"])
    head = build_head(config["head_kind"], tuple(c * n_t for c in backbone.feature_channels),
                      hidden=config["head_hidden"], feature_strides=backbone.feature_strides)
    head.load_state_dict(weights["head"])
    guide = None
    if config.get("guide_config") is not None:
        guide = CoordinateGuide(**config["guide_config"])
        guide.load_state_dict(weights["guide"])
    return Segmenter(backbone, pretrain_cfg, head, config["head_kind"], config["head_hidden"],
                     tuple(config["timesteps"]), config["patch_size_zyx"], config["spacing_zyx_mm"],
                     config["body_threshold_hu"], config["overlap"], guide, config["seed"], config.get("card"),
                     config.get("island_fraction", 0.0))
