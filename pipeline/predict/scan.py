"""Predict one discovered input: read it through the ingestion code (same discovery, QC and PHI rules as
``anatdiff preprocess``), run the segmenter on the preprocessed grid, write the label map on the ORIGINAL grid.

``predict_item`` never raises for a bad input: it returns a row with status "rejected" and the ingestion's
one-line reason. Plain Python (no Ray): ``pipeline.distributed.predict`` maps ``predict_unit`` over the inputs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluation.postprocess import remove_islands
from pipeline.ingest.geometry import Grid
from pipeline.ingest.preprocess import (dicom_fields, label_on_grid, one_line, read_checked, read_series,
                                        split_dicom_folder)
from pipeline.ingest.qc import Rejected
from pipeline.ingest.resume import write_done
from pipeline.io.filesystems import download, is_remote, remove_tree
from pipeline.io.dicom import Series
from pipeline.io.layouts import DICOM_FOLDER, Item
from pipeline.labels import ORGANS
from pipeline.predict.outputs import organ_volumes_ml, overlay_png, voxel_volume_ml, write_label_nifti
from pipeline.predict.restore import label_image, labels_on_reference, model_input
from pipeline.predict.segmenter import Segmenter, checked_probs

STATUSES = ("predicted", "rejected", "skipped")
OVERLAY_DIR = "overlays"
#: row fields naming output files (relative to the output folder)
OUTPUT_FIELDS = ("label_path", "overlay_path", "seg_path")


@dataclass(frozen=True)
class PredictOptions:
    """Output settings: ``max_voxels`` (reject larger headers), ``overlays`` (PNG per scan), ``dicom_seg``
    (a DICOM SEG per DICOM series, highdicom)."""

    max_voxels: int = 1_200_000_000
    overlays: bool = True
    dicom_seg: bool = False


def new_row(**values) -> dict:
    """A predictions row: every field None (``files`` [], ``volumes_ml``/``dice`` {}), then ``values``."""
    row = {"item_id": None, "source": None, "kind": None, "files": [], "status": None, "reason": None,
           "label_path": None, "overlay_path": None, "seg_path": None, "size_xyz": None, "spacing_xyz_mm": None,
           "seconds": None, "volumes_ml": {}, "dice": {}, "dice_note": None}
    unknown = set(values) - set(row)
    if unknown:
        raise ValueError(f"unknown predictions fields {sorted(unknown)}")
    return {**row, **values}


def skipped_row(rel_path: str, reason: str) -> dict:
    """The row of an input file that is not an image (as in the preprocess manifest)."""
    return new_row(source=rel_path, files=[rel_path], status="skipped", reason=reason)


def dice_per_organ(truth_zyx: np.ndarray, pred_zyx: np.ndarray) -> dict[str, float]:
    """Dice 2|A & B| / (|A| + |B|) of every organ present in ``truth_zyx`` or ``pred_zyx`` (same shape)."""
    n = len(ORGANS) + 1
    both = np.bincount(truth_zyx[truth_zyx == pred_zyx].ravel(), minlength=n)
    t, p = np.bincount(truth_zyx.ravel(), minlength=n), np.bincount(pred_zyx.ravel(), minlength=n)
    return {name: float(2 * both[k] / (t[k] + p[k])) for k, name in enumerate(ORGANS, start=1) if t[k] + p[k]}


def _read(item: Item, series: Series | None, max_voxels: int):
    """The image of one series (from the header pass of ``split_dicom_folder``) or image file, through the
    preprocess QC. Raises Rejected."""
    if series is None:
        return read_checked(item, max_voxels)
    if series.damaged:
        raise Rejected(f"damaged slice: {len(series.damaged)} file(s) of this series could not be read")
    dicom_fields(series.headers[0].tags, secret=None)  # QC only (modality CT); nothing it reads is kept
    return read_series(series, max_voxels)


def _predict(item: Item, segmenter: Segmenter, out_dir: Path, row: dict, options: PredictOptions,
             series: Series | None = None) -> None:
    """Fill ``row`` and write the outputs of one readable series or image file. Raises Rejected."""
    image = _read(item, series, options.max_voxels)
    inputs = model_input(image, segmenter.spacing_zyx_mm, segmenter.body_threshold_hu)
    probs = checked_probs(segmenter.predict_probs(inputs.volume_hu, inputs.mask), inputs.volume_hu.shape)
    labels = remove_islands(labels_on_reference(probs, inputs.grid, image),
                            float(getattr(segmenter, "island_fraction", 0.0)))
    del probs, inputs
    label = label_image(labels, image)
    row.update(size_xyz=list(image.GetSize()), spacing_xyz_mm=[float(s) for s in image.GetSpacing()],
               volumes_ml=organ_volumes_ml(labels, voxel_volume_ml(image)))
    if item.label:
        try:
            row["dice"] = dice_per_organ(label_on_grid(item.label, Grid.of(image)), labels)
        except Rejected as e:  # a bad reference label does not spoil the prediction
            row["dice_note"] = str(e)
    if options.overlays:
        rel = f"{OVERLAY_DIR}/{item.item_id}.png"
        overlay_png(image, label, out_dir / rel, title=item.item_id)
        row["overlay_path"] = rel
    if options.dicom_seg and item.kind == "dicom":
        from pipeline.predict.dicom_seg import write_dicom_seg

        rel = f"{item.item_id}.seg.dcm"
        if write_dicom_seg(out_dir / rel, labels, item.local_files()):
            row["seg_path"] = rel
    rel = f"{item.item_id}.nii.gz"
    write_label_nifti(out_dir / rel, label)
    row["label_path"] = rel


def predict_item(item: Item | dict, segmenter: Segmenter, out_dir: str | Path,
                 options: PredictOptions = PredictOptions(), series: Series | None = None) -> dict:
    """Predict one image file or DICOM series into ``out_dir``; return its row (a JSON-able dict).

    Writes ``<item_id>.nii.gz`` (uint8 BTCV labels with the input image's size, spacing, origin and
    direction), ``overlays/<item_id>.png`` and, when asked for, ``<item_id>.seg.dcm`` (DICOM SEG of a DICOM
    series). The row holds the organ volumes (mL) and, when the item has a reference label (a labelled
    layout), the Dice per organ against it. Never raises for a bad input.
    """
    item = Item.from_dict(item) if isinstance(item, dict) else item
    if item.kind == DICOM_FOLDER and series is None:
        found, _ = split_dicom_folder(item)
        if len(found) == 1:
            (item, series), = found
    out_dir = Path(out_dir)
    row = new_row(item_id=item.item_id, source=item.source, kind=item.kind, files=list(item.files))
    start = time.perf_counter()
    try:
        if item.kind == DICOM_FOLDER:
            raise Rejected("several series: this folder holds no single DICOM series; use predict_unit")
        _predict(item, segmenter, out_dir, row, options, series)
        row["status"] = "predicted"
    except Rejected as e:
        row.update(status="rejected", reason=str(e))
    except MemoryError:
        row.update(status="rejected", reason="out of memory: the volume is too large for this worker")
    except Exception as e:  # noqa: BLE001 - one odd file must not stop the run; the reason says what broke
        row.update(status="rejected", reason=f"error: {type(e).__name__}: {one_line(e)}")
    if row["status"] == "rejected":
        for field in OUTPUT_FIELDS:
            if row[field]:
                (out_dir / row[field]).unlink(missing_ok=True)
        row.update({f: None for f in OUTPUT_FIELDS}, volumes_ml={}, dice={})
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def predict_series(item: Item, segmenter: Segmenter, out_dir: str | Path,
                   options: PredictOptions = PredictOptions()) -> list[dict]:
    """Rows of one discovered item: a ``dicom-folder`` gives one row per series (ids as preprocess gives
    them) plus a skipped row per non-DICOM file; any other item its single ``predict_item`` row."""
    if item.kind != DICOM_FOLDER:
        return [predict_item(item, segmenter, out_dir, options)]
    series, skipped = split_dicom_folder(item)
    rows = [predict_item(s_item, segmenter, out_dir, options, s) for s_item, s in series]
    if item.label and not series:
        skipped.append((item.files[-1], "label without image (its DICOM folder holds no readable series)"))
    return rows + [skipped_row(rel, reason) for rel, reason in skipped]


def predict_unit(item: Item | dict, segmenter: Segmenter, input_root: str, out_dir: str | Path, key: str,
                 options: PredictOptions = PredictOptions()) -> list[dict]:
    """``predict_series`` of one discovered item, then its done marker (``OUT/private/done/<item_id>.json`` with
    ``key``). An object-store item (``input_root`` s3:// or gs://) is downloaded to a local temporary folder
    first and deleted afterwards; a failed download gives a rejected row without a marker (a rerun retries)."""
    item = Item.from_dict(item) if isinstance(item, dict) else item
    local_dir = None
    try:
        if is_remote(input_root):
            local_dir = tempfile.mkdtemp(prefix="anatdiff-predict-")
            try:
                download(input_root, item.files, local_dir)
            except OSError as e:
                return [new_row(item_id=item.item_id, source=item.source, kind=item.kind, files=list(item.files),
                                status="rejected", reason=f"download failed: {one_line(e)}")]
            item = item.rebased(local_dir)
        rows = predict_series(item, segmenter, out_dir, options)
    finally:
        if local_dir is not None:
            remove_tree(local_dir)
    write_done(out_dir, item.item_id, key, rows)
    return rows
