"""Weight files and wrapped modules, shared by every stage that saves or loads a network.

``load_plain`` reads a torch file as tensors and plain data only (a checkpoint may come from a shared MLflow
server or bucket, and unpickling arbitrary objects would run their code); ``unwrap`` strips DDP and
``torch.compile`` wrappers so that state-dict keys carry no prefixes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import UserError


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (state-dict keys without prefixes)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_plain(path: str | Path, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python data only, never arbitrary objects.

    Raises UserError naming the file when it holds anything else (a pickled class or function: a file
    not written by anatdiff, or a tampered one), instead of running that object's code.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"'{path}' holds more than tensors and plain data, refused (torch.load weights_only: "
                        f"{first[:200]})") from None
