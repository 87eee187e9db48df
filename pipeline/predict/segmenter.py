"""The segmenter interface predict runs, and the checks of what a segmenter declares and returns.

A segmenter is loaded from a local folder (``pipeline.evaluation.segmenter.load_segmenter``, or a factory a
caller passes); it works on the grid that ``anatdiff preprocess`` writes: canonical LPS, resampled to its
``spacing_zyx_mm``, cropped to the body box. Everything here is plain numpy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline.config import UserError
from pipeline.labels import ORGANS

#: output channels: background + the 13 BTCV organs
NUM_CLASSES = len(ORGANS) + 1
#: a voxel's class probabilities may sum to 1 within this
SUM_TOLERANCE = 1e-3


class Segmenter(Protocol):
    """What predict needs from a trained segmenter.

    ``spacing_zyx_mm``: the grid the model works on (canonical LPS, z y x, mm). ``body_threshold_hu``: the body
    mask rule used in training (preprocess's ``body_threshold_hu``). ``label_names``: the 13 BTCV organ names,
    label k + 1 = ``label_names[k]``. Optional ``island_fraction`` (default 0: none): each
    organ's islands below that fraction of its largest component are removed from the label map on the scan's
    own grid (``pipeline.evaluation.postprocess.remove_islands``).
    """

    spacing_zyx_mm: tuple[float, float, float]
    body_threshold_hu: float
    label_names: tuple[str, ...]

    def predict_probs(self, volume_hu_zyx: np.ndarray, mask_zyx: np.ndarray) -> np.ndarray:
        """(14, Z, Y, X) float32 class probabilities (channel 0 background, summing to 1 per voxel) of a
        (Z, Y, X) int16 HU volume on ``spacing_zyx_mm`` (canonical, cropped to the body box exactly as
        ``anatdiff preprocess`` writes ``volumes/``) and its (Z, Y, X) bool body mask."""
        ...


SegmenterFactory = Callable[[str], Segmenter]


def load_from_folder(folder: str | Path) -> Segmenter:
    """The trained segmenter saved in ``folder`` (``pipeline.evaluation.segmenter.load_segmenter``)."""
    try:
        from pipeline.evaluation.segmenter import load_segmenter
    except ImportError as e:
        raise UserError(f"this anatdiff has no segmenter loader ({e}); train and register a segmenter with "
                        "`anatdiff evaluate` from a version that has one") from None
    return load_segmenter(str(folder))


def check_segmenter(segmenter: Segmenter) -> None:
    """Raises UserError when the segmenter's declared grid, threshold or labels are not usable."""
    spacing = tuple(getattr(segmenter, "spacing_zyx_mm", ()) or ())
    if len(spacing) != 3 or not all(isinstance(s, (int, float)) and 0 < s <= 20 for s in spacing):
        raise UserError(f"the segmenter's spacing_zyx_mm must be 3 values in (0, 20] mm, got {spacing}")
    threshold = getattr(segmenter, "body_threshold_hu", None)
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise UserError(f"the segmenter's body_threshold_hu must be a finite number, got {threshold!r}")
    names = tuple(getattr(segmenter, "label_names", ()) or ())
    if names != ORGANS:
        raise UserError(f"the segmenter's label_names must be the 13 BTCV organs in order {ORGANS}, got {names}")
    fraction = getattr(segmenter, "island_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise UserError(f"the segmenter's island_fraction must be a number in [0, 1], got {fraction!r}")


def checked_probs(probs, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """``probs`` as a (14, Z, Y, X) float32 array after checking its shape, values and per-voxel sums.

    Raises ValueError naming what is wrong (a broken model, not a bad scan)."""
    probs = np.asarray(probs, dtype=np.float32)
    expected = (NUM_CLASSES, *shape_zyx)
    if probs.shape != expected:
        raise ValueError(f"segmenter returned probabilities of shape {probs.shape}, expected {expected}")
    if not np.isfinite(probs).all() or probs.min() < -SUM_TOLERANCE:
        raise ValueError("segmenter returned non-finite or negative probabilities")
    total = probs.sum(axis=0, dtype=np.float64)
    worst = float(np.abs(total - 1.0).max())
    if worst > SUM_TOLERANCE:
        raise ValueError(f"segmenter probabilities do not sum to 1 per voxel (off by up to {worst:.3g})")
    return probs
