"""Checkpoint files: training state for resume, and the exported model a downstream job loads.

``state.pt``: model, EMA, optimizer, step (the data stream is a function of the step, so it needs no state).
``model.pt``: EMA weights + the resolved pretrain config, loadable with ``load_pretrained``.

Every file holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool, None; configs as
``model_dump(mode="json")``) and is read with ``load_plain`` (pipeline/models/weights.py,
``torch.load(weights_only=True)``): a checkpoint may come from a shared MLflow server or bucket, and unpickling
arbitrary objects would run their code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import PretrainConfig, UserError
from pipeline.models.weights import load_plain, unwrap

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


def save_state(directory: Path, model: nn.Module, ema: nn.Module, optimizer, step: int,
               cfg: PretrainConfig, extra: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": unwrap(model).state_dict(),
        "ema": unwrap(ema).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }, directory / STATE_FILE)
    save_model(directory / MODEL_FILE, ema, cfg, step)


def load_state(directory: Path, map_location="cpu") -> dict[str, Any]:
    """The ``state.pt`` dict of a checkpoint folder (see ``save_state``)."""
    return load_plain(directory / STATE_FILE, map_location=map_location)


def save_model(path: Path, model: nn.Module, cfg: PretrainConfig, step: int) -> None:
    """The backbone's weights (a training wrapper's ``backbone``: heads used only in training stay out)."""
    module = unwrap(model)
    torch.save({"format": "anatdiff.model/1", "state_dict": getattr(module, "backbone", module).state_dict(),
                "config": cfg.model_dump(mode="json"), "step": step}, path)


def load_pretrained(path: str | Path, random_init: bool = False, seed: int = 0,
                    guidance: str | None = None) -> tuple[nn.Module, PretrainConfig]:
    """Rebuild the backbone from ``model.pt``; ``random_init`` keeps the architecture, drops the weights, and
    with ``guidance`` ("none" / "bodybox") also changes the network's coordinate input (the ceiling's)."""
    from pipeline.train.step import build_model

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"no pretrained model at '{path}'")
    blob = load_plain(path)
    if not isinstance(blob, dict) or blob.get("format") != "anatdiff.model/1":
        raise UserError(f"'{path}' is not an anatdiff model file (expected format anatdiff.model/1)")
    cfg = PretrainConfig.model_validate(blob["config"])
    if guidance is not None and guidance != cfg.model.guidance:
        if not random_init:
            raise ValueError("the coordinate input of pretrained weights cannot change: pass random_init=True")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"guidance": guidance})})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if not random_init:
        model.load_state_dict(blob["state_dict"])
    return model, cfg
