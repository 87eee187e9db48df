"""Files predict writes per scan: the label map (NIfTI, original geometry), organ volumes, an overlay PNG.

Every file is written under a temporary name beside its target and renamed, so a killed run leaves either the
whole file or a ``.<name>.tmp-<pid>...`` leftover that the next run deletes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from pipeline.ingest.geometry import direction_matrix, to_canonical
from pipeline.io.atomic import write_atomic
from pipeline.labels import NUM_ORGANS, ORGANS

#: display window of the overlays (soft-tissue abdomen), HU
WINDOW_HU = (-160.0, 240.0)


def write_label_nifti(path: Path, label: sitk.Image) -> Path:
    """``label`` (uint8) as compressed NIfTI at ``path``, atomically."""
    return write_atomic(path, lambda tmp: sitk.WriteImage(label, str(tmp), useCompression=True))


def voxel_volume_ml(image: sitk.Image) -> float:
    """Volume of one voxel of ``image`` in millilitres: spacing product x |det(direction)| / 1000."""
    return float(np.prod(image.GetSpacing()) * abs(np.linalg.det(direction_matrix(image))) / 1000.0)


def organ_volumes_ml(labels_zyx: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """``<organ>_ml`` for the 13 BTCV organs: voxel count x ``voxel_ml`` (mL); 0.0 for an absent organ."""
    counts = np.bincount(np.asarray(labels_zyx).ravel(), minlength=NUM_ORGANS + 1)
    return {f"{name}_ml": float(counts[k + 1] * voxel_ml) for k, name in enumerate(ORGANS)}


def _organ_cmap() -> ListedColormap:
    """A fixed colour per label 1..13 (tab20), as in the evaluation overlays."""
    from matplotlib import colormaps

    return ListedColormap([colormaps["tab20"](k % 20) for k in range(NUM_ORGANS)])


def _centre_kji(labels_zyx: np.ndarray) -> tuple[int, int, int]:
    """The foreground centroid (voxel index z, y, x), or the volume centre when nothing is labelled."""
    found = np.nonzero(labels_zyx)
    if not found[0].size:
        return tuple(s // 2 for s in labels_zyx.shape)
    return tuple(int(round(float(np.mean(a)))) for a in found)


def overlay_png(image: sitk.Image, label: sitk.Image, path: Path, title: str = "") -> Path:
    """Three planes through the predicted foreground's centroid (axial, coronal, sagittal), labels over the
    scan in grey, written atomically to ``path``.

    Both images are shown in the canonical LPS orientation (``to_canonical``; an oblique scan is resampled for
    display only): axial with anterior up and the patient's right on the left, coronal and sagittal with
    superior up; pixel aspect from the spacing.
    """
    canonical_image, canonical_label = to_canonical(image), to_canonical(label, is_label=True)
    volume = sitk.GetArrayViewFromImage(canonical_image)       # views: the images stay referenced above
    labels = sitk.GetArrayViewFromImage(canonical_label)
    sx, sy, sz = canonical_label.GetSpacing()
    k, j, i = _centre_kji(labels)
    planes = (("axial", volume[k], labels[k], sy / sx, "upper"),
              ("coronal", volume[:, j, :], labels[:, j, :], sz / sx, "lower"),
              ("sagittal", volume[:, :, i], labels[:, :, i], sz / sy, "lower"))
    fig = Figure(figsize=(12.0, 4.4), layout="constrained")
    cmap = _organ_cmap()
    for n, (name, grey, organs, aspect, origin) in enumerate(planes):
        ax = fig.add_subplot(1, 3, n + 1)
        ax.imshow(grey, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect, origin=origin)
        ax.imshow(np.ma.masked_equal(organs.astype(np.int64), 0), cmap=cmap, vmin=0.5, vmax=NUM_ORGANS + 0.5,
                  alpha=0.5, aspect=aspect, origin=origin, interpolation="nearest")
        present = sorted(set(np.unique(organs).tolist()) - {0})
        ax.set_title(f"{name}: " + (", ".join(ORGANS[p - 1] for p in present[:4]) or "no organ")
                     + (" ..." if len(present) > 4 else ""), fontsize="small")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize="small")
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80))
