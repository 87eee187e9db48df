"""Cross-validation summaries: per-fold Dice per organ -> mean and std across folds, as metrics and tables.

A fold's Dice of an organ is the mean over its test cases (NaN cases, organ in neither map, left out). A fold's
``dice_mean`` is the mean over organs of those. The run's ``dice_<organ>`` / ``dice_mean`` are means across
folds and ``*_std`` the population standard deviation across folds (ddof = 0; 0 for a single fold).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.metrics import dice_mean
from pipeline.labels import ORGANS


def _nan_stat(fn, values: np.ndarray, axis=None) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(values, axis=axis)


def mean_over_cases(per_case: Mapping[str, np.ndarray]) -> np.ndarray:
    """(13,) mean Dice per organ over cases, NaN where no case has the organ (empty-organ rule)."""
    if not per_case:
        raise ValueError("mean_over_cases needs at least one case, got none")
    return _nan_stat(np.nanmean, np.stack([np.asarray(v, np.float64) for v in per_case.values()]), axis=0)


@dataclass
class FoldSummary:
    """Across-fold statistics. ``organ_mean``/``organ_std``: (13,) float64; ``fold_means``: (folds,) Dice."""

    organ_mean: np.ndarray
    organ_std: np.ndarray
    fold_means: np.ndarray

    @property
    def mean(self) -> float:
        return float(_nan_stat(np.nanmean, self.fold_means)) if self.fold_means.size else float("nan")

    @property
    def std(self) -> float:
        return float(_nan_stat(np.nanstd, self.fold_means)) if self.fold_means.size else float("nan")

    def metrics(self, prefix: str = "", name: str = "dice") -> dict[str, float]:
        """``{prefix}{name}_<organ>``, ``..._std`` per organ, ``{prefix}{name}_mean`` and ``..._mean_std``."""
        out = {}
        for organ, m, s in zip(ORGANS, self.organ_mean, self.organ_std):
            out[f"{prefix}{name}_{organ}"] = float(m)
            out[f"{prefix}{name}_{organ}_std"] = float(s)
        out[f"{prefix}{name}_mean"] = self.mean
        out[f"{prefix}{name}_mean_std"] = self.std
        return out


def summarize_folds(per_fold_organ: list[np.ndarray]) -> FoldSummary:
    """per_fold_organ: one (13,) per-organ Dice (mean over the fold's test cases) per fold."""
    if not per_fold_organ:
        raise ValueError("summarize_folds needs at least one fold, got none")
    stacked = np.stack([np.asarray(v, np.float64) for v in per_fold_organ])
    return FoldSummary(organ_mean=_nan_stat(np.nanmean, stacked, axis=0),
                       organ_std=_nan_stat(np.nanstd, stacked, axis=0),
                       fold_means=np.array([dice_mean(v) for v in stacked]))


def _cell(mean: float, std: float, with_std: bool) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if with_std and not np.isnan(std) else f"{mean:.3f}"


def summary_table(columns: Mapping[str, FoldSummary], with_std: bool = True) -> str:
    """Markdown: a line per organ and a **mean** line, a column per summary (``mean ± std`` across folds)."""
    if not columns:
        raise ValueError("summary_table needs at least one column, got none")
    names = list(columns)
    lines = ["| organ | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k, organ in enumerate(ORGANS):
        cells = [_cell(columns[n].organ_mean[k], columns[n].organ_std[k], with_std) for n in names]
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    means = [_cell(columns[n].mean, columns[n].std, with_std) for n in names]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(columns: Mapping[str, FoldSummary]) -> str:
    """CSV with columns organ, <name>_mean, <name>_std, ...; the last row is ``mean`` (across-fold Dice)."""
    buf = io.StringIO()
    names = list(columns)
    buf.write("organ," + ",".join(f"{n}_mean,{n}_std" for n in names) + "\n")
    for k, organ in enumerate(ORGANS):
        buf.write(organ + "," + ",".join(f"{columns[n].organ_mean[k]:.6f},{columns[n].organ_std[k]:.6f}"
                                         for n in names) + "\n")
    buf.write("mean," + ",".join(f"{columns[n].mean:.6f},{columns[n].std:.6f}" for n in names) + "\n")
    return buf.getvalue()


def per_case_csv(rows: list[tuple[int, str, np.ndarray]]) -> str:
    """CSV of (fold, case, dice_<organ>..., dice_mean) for every test case; NaN written as empty."""
    buf = io.StringIO()
    buf.write("fold,case," + ",".join(f"dice_{o}" for o in ORGANS) + ",dice_mean\n")
    for fold, case, dice in rows:
        cells = ["" if np.isnan(v) else f"{v:.6f}" for v in dice]
        m = dice_mean(dice)
        buf.write(f"{fold},{case}," + ",".join(cells) + f",{'' if np.isnan(m) else f'{m:.6f}'}\n")
    return buf.getvalue()
