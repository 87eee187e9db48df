"""Whole-volume coordinates from a trained guide, and the ``guide.pt`` file format.

``guide.pt``: ``{"format": "anatdiff.guide/1", "state_dict", "config": model.config(), "meta"}``; ``meta`` is
free-form (training step, data, window) and comes back from ``load_guide_meta``. ``config["kind"]`` is "bpr"
for a body-part regression guide (``pipeline/guide/bpr.py``), absent (= "coords") for the 3-D guide; both load
with ``load_guide`` and give (3, D, H, W) maps with ``predict_coords``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import UserError
from pipeline.data.inputs import air_value, scale_hu
from pipeline.data.sliding import sliding_window_predict
from pipeline.guide.bpr import BodyPartRegressor, bpr_coords
from pipeline.guide.consistency import bodybox_scale_mm
from pipeline.guide.model import GUIDE_WINDOW_HU, CoordinateGuide, whole_volume_coords
from pipeline.models.weights import load_plain, unwrap

GUIDE_FORMAT = "anatdiff.guide/1"


def save_guide(path: str | Path, model: CoordinateGuide | BodyPartRegressor,
               meta: dict[str, Any] | None = None) -> Path:
    """Write ``guide.pt`` (weights incl. the axis scale, constructor config, ``meta``); returns the path."""
    model = unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": GUIDE_FORMAT, "state_dict": model.state_dict(), "config": model.config(),
                "meta": dict(meta or {})}, path)
    return path


def _read_guide_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "guide.pt"
    if not path.is_file():
        raise UserError(f"guide checkpoint '{path}' does not exist (train one with the guide job)")
    payload = load_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != GUIDE_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"'{path}' is not a guide checkpoint: format {got!r}, expected {GUIDE_FORMAT!r}")
    return payload


def load_guide(path: str | Path) -> CoordinateGuide | BodyPartRegressor:
    """Rebuild the guide of ``guide.pt`` (or a folder holding it), in eval mode on the CPU: a
    ``CoordinateGuide``, or a ``BodyPartRegressor`` when its config says ``kind: bpr``."""
    payload = _read_guide_file(path)
    config = dict(payload["config"])
    kind = config.pop("kind", "coords")
    if kind not in ("coords", "bpr"):
        raise UserError(f"guide checkpoint '{path}' has kind {kind!r}; this version reads coords and bpr")
    model = BodyPartRegressor(**config) if kind == "bpr" else CoordinateGuide(**config)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def guide_kind(path: str | Path) -> str:
    """"coords" or "bpr": which guide ``guide.pt`` holds (read from its config, no model built)."""
    return str(_read_guide_file(path)["config"].get("kind", "coords"))


def load_guide_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` dict stored by ``save_guide``."""
    return dict(_read_guide_file(path).get("meta", {}))


def guide_scale_mm(model, mask_zyx: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    """(3,) mm per coordinate unit of a guide's map on one scan: ``axis_scale_mm`` of a 3-D guide; for a bpr
    guide its z scale and, for y and x (body-box channels), the body's extent in mm (from ``mask_zyx``)."""
    scale = unwrap(model).axis_scale_mm.detach().cpu().double().numpy()
    if getattr(unwrap(model), "kind", "coords") == "bpr":
        return np.concatenate([scale, bodybox_scale_mm(mask_zyx, spacing_zyx_mm)[1:]])
    return scale


def predict_coords(model: CoordinateGuide | BodyPartRegressor, volume_hu_zyx: np.ndarray, window_zyx=None,
                   window_hu=GUIDE_WINDOW_HU, overlap: float = 0.25, body_bbox_zyx=None) -> np.ndarray:
    """Per-voxel coordinates of a whole volume: (3, D, H, W) float32 in [0, 1], channels (z, y, x).

    A bpr guide (``BodyPartRegressor``): ``bpr.bpr_coords`` (z = slice score, y and x = position in
    ``body_bbox_zyx``, found from the HU when None); window and overlap do not apply. A 3-D guide ignores
    ``body_bbox_zyx``.

    volume_hu_zyx: (D, H, W) HU (int16, canonical LPS, at the spacing the guide was trained around).
    window_zyx: None runs the whole (padded) volume at once; else sliding windows of that size (multiples of
    ``model.size_multiple``) with ``overlap`` and Gaussian blending. Computed without gradients, in eval mode,
    on the model's device.
    """
    if np.ndim(volume_hu_zyx) != 3:
        raise ValueError(f"volume_hu_zyx must be (D, H, W), got shape {np.shape(volume_hu_zyx)}")
    if getattr(model, "kind", "coords") == "bpr":
        return bpr_coords(model, volume_hu_zyx, body_bbox_zyx)
    if window_zyx is None:
        return whole_volume_coords(model, volume_hu_zyx, window_hu)
    window = tuple(int(w) for w in window_zyx)
    if len(window) != 3 or any(w < 1 or w % model.size_multiple for w in window):
        raise ValueError(f"window_zyx must be 3 multiples of {model.size_multiple}, got {window_zyx}")
    device = next(model.parameters()).device
    x = torch.from_numpy(scale_hu(np.asarray(volume_hu_zyx), window_hu))[None, None].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = sliding_window_predict(x, model.forward_full, window, overlap=overlap, pad_value=air_value(window_hu))
    model.train(was_training)
    d, h, w = x.shape[2:]
    return out[0, :, :d, :h, :w].float().cpu().numpy()
