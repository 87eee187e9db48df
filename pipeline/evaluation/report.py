"""Report figures as PNG files: Dice per organ as bars, and an axial slice with reference vs prediction.

Uses ``matplotlib.figure.Figure`` directly (no pyplot, no global backend switch), so it runs headless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from pipeline.labels import NUM_ORGANS, ORGANS


def dice_bar_chart(per_organ: Mapping[str, np.ndarray], path: str | Path, title: str = "Dice per organ",
                   organs: Sequence[str] = ORGANS) -> Path:
    """Grouped bar chart PNG: one group per organ plus "mean", one bar per named row (e.g. "pretrained").

    per_organ: name -> (len(organs),) float Dice in [0, 1]; NaN (organ in neither map) draws no bar.
    Returns the written path.
    """
    if not per_organ:
        raise ValueError("dice_bar_chart needs at least one named row, got none")
    names = list(per_organ)
    groups = [*organs, "mean"]
    fig = Figure(figsize=(max(6.0, 0.6 * len(groups) * max(1, len(names)) ** 0.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        values = np.asarray(per_organ[name], dtype=np.float64)
        if values.shape != (len(organs),):
            raise ValueError(f"row '{name}' has shape {values.shape}, expected ({len(organs)},)")
        mean = np.nanmean(values) if not np.all(np.isnan(values)) else np.nan
        heights = np.nan_to_num(np.append(values, mean), nan=0.0)
        ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, groups, rotation=45, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.savefig(path, dpi=100)
    return Path(path)


def _organ_cmap() -> ListedColormap:
    """Fixed colour per label 1..13 (tab20), so the same organ has the same colour in every figure."""
    from matplotlib import colormaps
    return ListedColormap([colormaps["tab20"](k % 20) for k in range(NUM_ORGANS)])


def overlay_png(image_zyx_hu: np.ndarray, label_zyx: np.ndarray, pred_zyx: np.ndarray, path: str | Path,
                z: int | None = None, window_hu: tuple[float, float] = (-160.0, 240.0),
                spacing_zyx_mm: Sequence[float] | None = None) -> Path:
    """Axial slice ``z`` side by side: reference labels (left) and prediction (right) over the CT in grey;
    the prediction panel also outlines the reference foreground in white.

    image_zyx_hu: (D, H, W) HU; label_zyx, pred_zyx: (D, H, W) int labels 0..13. ``z`` defaults to the slice
    with most reference foreground (the middle slice if there is none). Displayed in the radiological view
    of the canonical LPS array: anterior at the top, patient's right on the left. ``spacing_zyx_mm`` sets the
    pixel aspect (y / x). Returns the written path.
    """
    image, label, pred = np.asarray(image_zyx_hu), np.asarray(label_zyx), np.asarray(pred_zyx)
    if image.ndim != 3 or label.shape != image.shape or pred.shape != image.shape:
        raise ValueError(f"image {image.shape}, label {label.shape} and pred {pred.shape} must be equal (D, H, W)")
    if z is None:
        counts = (label > 0).sum(axis=(1, 2))
        z = int(counts.argmax()) if counts.any() else image.shape[0] // 2
    if not 0 <= z < image.shape[0]:
        raise ValueError(f"z must be a slice index in [0, {image.shape[0] - 1}], got {z}")
    aspect = 1.0 if spacing_zyx_mm is None else float(spacing_zyx_mm[1]) / float(spacing_zyx_mm[2])
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    cmap = _organ_cmap()
    for i, (title, labels) in enumerate((("reference", label), ("prediction", pred))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(image[z], cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect=aspect)
        organs = np.ma.masked_equal(labels[z].astype(np.int64), 0)
        ax.imshow(organs, cmap=cmap, vmin=0.5, vmax=NUM_ORGANS + 0.5, alpha=0.5, aspect=aspect,
                  interpolation="nearest")
        if i == 1 and label[z].any():  # reference outline on the prediction, so misses and shifts show
            ax.contour(label[z] > 0, levels=[0.5], colors="white", linewidths=0.8)
        present = sorted(set(np.unique(labels[z]).tolist()) - {0})
        ax.set_title(f"{title}, z={z}: " + ", ".join(ORGANS[k - 1] for k in present[:4])
                     + (" ..." if len(present) > 4 else ""), fontsize="small")
        ax.set_axis_off()
    fig.savefig(path, dpi=100)
    return Path(path)
