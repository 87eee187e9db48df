"""An exported backbone's API: load it (and its learned guide) and read its features with torch + numpy only.

`anatdiff export` (``pipeline/evaluation/export.py``) ships this module as the ``__init__`` of the package
``anatdiff_backbone``, together with the package modules it imports (the UNet and its blocks, the input
conventions, coordinates -> conditioning channels, the diffusion schedule and the feature readout, the guide
network), with their ``pipeline.`` imports renamed ``anatdiff_backbone.``. The exported code is the code that
trained and evaluates the backbone, not a second copy of its conventions. Inside anatdiff it reads export
folders as well (``from pipeline.evaluation import portable``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.data.conditioning import bodybox_coords, cond_channels
from pipeline.data.inputs import PAD_HU, body_bbox_zyx, scale_hu
from pipeline.diffusion.readout import backbone_features
from pipeline.diffusion.schedules import DiffusionSchedule
from pipeline.guide.model import CoordinateGuide, whole_volume_coords
from pipeline.models.unet3d import build_denoiser

__all__ = ["PAD_HU", "body_bbox_zyx", "bodybox_coords", "extract_features", "guide_coords", "load_backbone",
           "load_config", "load_guide", "scale_hu"]


def load_config(directory) -> dict:
    """``config.json`` of an export folder: ``objective``, ``model``, ``diffusion``, ``patches``, ``guide`` and
    ``conventions``."""
    return json.loads((Path(directory) / "config.json").read_text())


def _settings(section: dict) -> SimpleNamespace:
    """A config section with attribute access, as the package's builders read their pydantic configs."""
    return SimpleNamespace(**section)


def load_backbone(directory, map_location="cpu"):
    """(UNet3D in eval mode with the exported weights loaded strictly, config dict)."""
    config = load_config(directory)
    settings = _settings(config["model"])
    model = build_denoiser(settings, in_channels=1, out_channels=1, cond_channels=cond_channels(settings))
    state = torch.load(Path(directory) / "weights.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval(), config


def load_guide(directory, map_location="cpu"):
    """The learned coordinate guide (eval mode), or None when the backbone was not trained with one."""
    config = load_config(directory)
    if config.get("guide") is None:
        return None
    guide = CoordinateGuide(**config["guide"])
    state = torch.load(Path(directory) / "guide_weights.pt", map_location=map_location, weights_only=True)
    guide.load_state_dict(state, strict=True)
    return guide.eval()


def guide_coords(guide, volume_hu_zyx):
    """(3, D, H, W) float32 learned coordinates of a whole (D, H, W) HU volume (padded with air, cropped back)."""
    return whole_volume_coords(guide, volume_hu_zyx)


def extract_features(model, config, image01, coords=None, timesteps=(50,), noise=None):
    """Multi-scale decoder features, coarsest first: list of (B, C_i * len(timesteps), D/s_i, H/s_i, W/s_i).

    image01: (B, 1, D, H, W) float, HU windowed to [0, 1] (``scale_hu``); D, H, W multiples of
    ``config["conventions"]["size_multiple"]``. coords: (B, 3, D, H, W) body coordinates (z, y, x) in about
    [0, 1] (``guide_coords`` or ``bodybox_coords``), ignored when unguided. A diffusion backbone sees its input
    noised to each timestep (``noise``: standard normal like image01, drawn when None); a restorative or
    contrastive one sees it clean at t = 0.
    """
    noise = torch.randn_like(image01) if noise is None else noise
    schedule = DiffusionSchedule.from_config(_settings(config["diffusion"]))
    return backbone_features(model, _settings(config["model"]), schedule, image01, coords, noise, timesteps,
                             config.get("objective", "diffusion"))
