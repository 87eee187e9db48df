"""Dice per organ with the empty-organ rule, its mean, and a markdown table for reports.

The empty-organ rule (vox2vec / BTCV practice, stated so results compare):
- organ absent from the reference and from the prediction -> NaN (left out of the mean);
- organ absent from the reference but predicted -> 0.0 (a false positive counts against the model);
- organ present in the reference -> 2|A n B| / (|A| + |B|).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.labels import NUM_ORGANS, ORGANS


def _check_label_map(name: str, array: np.ndarray, num_organs: int) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label map, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > num_organs):
        raise ValueError(f"{name} values must be in [0, {num_organs}], got [{array.min()}, {array.max()}]")
    return array


def dice_per_organ(pred_zyx: np.ndarray, label_zyx: np.ndarray, num_organs: int = NUM_ORGANS) -> np.ndarray:
    """Dice of each organ between two label maps, with the empty-organ rule (module docstring).

    pred_zyx, label_zyx: (D, H, W) integer label maps (0 background, 1..num_organs), same shape.
    Returns (num_organs,) float64; entry k is the Dice of label k + 1, NaN where the organ is in neither map.
    """
    pred = _check_label_map("pred_zyx", pred_zyx, num_organs)
    label = _check_label_map("label_zyx", label_zyx, num_organs)
    if pred.shape != label.shape:
        raise ValueError(f"pred_zyx shape {pred.shape} differs from label_zyx shape {label.shape}")
    n = num_organs + 1
    # confusion[i, j] = voxels with reference i and prediction j, in one pass over the volume
    pair = label.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel()
    confusion = np.bincount(pair, minlength=n * n).reshape(n, n)
    intersection = np.diag(confusion)[1:].astype(np.float64)
    size_ref = confusion.sum(axis=1)[1:].astype(np.float64)
    size_pred = confusion.sum(axis=0)[1:].astype(np.float64)
    total = size_ref + size_pred
    dice = np.full(num_organs, np.nan)
    present = total > 0
    dice[present] = 2.0 * intersection[present] / total[present]
    return dice


def dice_mean(per_organ: np.ndarray) -> float:
    """Mean Dice over organs, ignoring NaN (organ in neither map); NaN if every entry is NaN.

    per_organ: (num_organs,) float, as returned by `dice_per_organ` (or a (cases, organs) array: all entries).
    """
    values = np.asarray(per_organ, dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmean(values))


def _fmt(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def dice_table(rows: Mapping[str, np.ndarray], organs: tuple[str, ...] = ORGANS) -> str:
    """Markdown table: one line per organ plus a ``mean`` line, one column per named row of Dice values.

    rows: name (e.g. "pretrained", "random init") -> (len(organs),) float Dice per organ; NaN shows "n/a".
    The mean line is `dice_mean` of each column.
    """
    if not rows:
        raise ValueError("dice_table needs at least one named row, got none")
    columns = {name: np.asarray(values, dtype=np.float64) for name, values in rows.items()}
    for name, values in columns.items():
        if values.shape != (len(organs),):
            raise ValueError(f"dice_table row '{name}' has shape {values.shape}, expected ({len(organs)},)")
    names = list(columns)
    lines = ["| organ | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k, organ in enumerate(organs):
        lines.append(f"| {organ} | " + " | ".join(_fmt(columns[n][k]) for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(_fmt(dice_mean(columns[n])) for n in names) + " |")
    return "\n".join(lines) + "\n"
