"""Preprocess one CT item: QC, canonical orientation, resampling, body crop, int16 HU + masks on disk.

``preprocess_item`` never raises for a bad input: it returns a manifest row with status "rejected" and a
one-line reason whose prefix (before ':') names the rule.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.config import PreprocessConfig
from pipeline.ingest.body import bbox_zyx, body_mask
from pipeline.ingest.geometry import Grid, resample_hu_int16, resample_label_onto, to_canonical
from pipeline.ingest.manifest import empty_row, patient_key, skipped_row
from pipeline.ingest.phi import scanner_key
from pipeline.ingest.qc import (MIN_SLICES, Rejected, check_complete, check_ct_intensity, check_header,
                                check_localizer, check_pixels, check_slice_positions)
from pipeline.ingest.report import hu_histogram
from pipeline.io.dicom import series_labels, split_series
from pipeline.io.layouts import DICOM_FOLDER, Item, make_item_id
from pipeline.io.readers import nifti_data_bytes, nifti_nonfinite_count, read_dicom_tags, read_header, read_image
from pipeline.labels import NUM_ORGANS

__all__ = ["MIN_SLICES", "Rejected", "check_header", "preprocess_item", "preprocess_unit", "split_dicom_folder"]

HU_RANGE = (-1024, 3071)
#: body box margin on each side, in mm
CROP_MARGIN_MM = 10.0


def one_line(err: BaseException, limit: int = 240) -> str:
    """An exception as one short line, without ITK's build-path noise."""
    text = re.sub(r"/\S*(SimpleITK|ITK)\S*:\d+:\s*", "", str(err))
    text = " ".join(text.split()) or type(err).__name__
    return text[:limit]


def _number(text: str | None) -> float | None:
    try:
        return float(text.split("\\")[0]) if text else None
    except ValueError:
        return None


def dicom_fields(item: Item, salt: str | None = None) -> dict:
    """Manifest fields from a DICOM item's first slice: modality, scanner_key (manufacturer|model|kernel),
    slice_thickness_mm, kvp, contrast, patient_key (salted hash). No other tag is read. Raises Rejected if
    not CT."""
    try:
        tags = read_dicom_tags(item.image, item.series_uid, item.local_files())
    except Exception as e:  # noqa: BLE001 - any reader failure is a property of the file
        raise Rejected(f"unreadable: {one_line(e)}") from None
    modality = tags["Modality"] or "unknown"
    if modality != "CT":
        raise Rejected(f"not CT: modality {modality}")
    return {"modality": modality, "scanner_key": scanner_key(tags),
            "patient_key": patient_key(tags["PatientID"], salt),
            "slice_thickness_mm": _number(tags["SliceThickness"]), "kvp": _number(tags["KVP"]),
            "contrast": bool(tags["ContrastBolusAgent"])}


def check_dicom_series(item: Item) -> None:
    """Series-level QC from the slice headers: one series, localizer/scout, slice gaps. Raises Rejected."""
    series, unreadable = split_series(item.local_files())
    if unreadable:
        raise Rejected(f"unreadable: {len(unreadable)} of {len(item.local_files())} slice files are not "
                       "readable DICOM images")
    if len(series) != 1:
        raise Rejected(f"several series: {len(series)} series (UID + geometry) in one item")
    check_localizer(series[0].image_types)
    check_slice_positions(series[0].positions_mm)


def read_checked(item: Item, max_voxels: int) -> sitk.Image:
    """Header QC, then pixels, then pixel QC. Raises Rejected."""
    files = item.local_files() if item.kind == "dicom" else None
    try:
        header = read_header(item.image, item.series_uid, files)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable: {one_line(e)}") from None
    check_header(header, max_voxels)
    if item.kind == "nifti":
        check_complete(*nifti_data_bytes(item.image))
    try:
        image = read_image(item.image, item.series_uid, files)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable: {one_line(e)}") from None
    floats = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    check_pixels(image, nifti_nonfinite_count(item.image) if floats and item.kind == "nifti" else 0)
    if item.kind != "dicom":
        check_ct_intensity(sitk.GetArrayViewFromImage(image))
    return image


def label_on_grid(label_path: str, grid: Grid) -> np.ndarray:
    """(Z, Y, X) uint8 BTCV label sampled onto ``grid`` in physical space. Raises Rejected."""
    try:
        label = read_image(label_path)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable label: {one_line(e)}") from None
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise Rejected(f"bad label: {label.GetDimension()}-D with {label.GetNumberOfComponentsPerPixel()} "
                       "components, need a 3-D scalar label")
    values = np.unique(sitk.GetArrayViewFromImage(label))
    if values.min() < 0 or values.max() > NUM_ORGANS or np.any(values != np.round(values)):
        raise Rejected(f"bad label: values {values[:8].tolist()} not integers in 0..{NUM_ORGANS} (BTCV)")
    out = sitk.GetArrayFromImage(resample_label_onto(sitk.Cast(label, sitk.sitkUInt8), grid.image(sitk.sitkUInt8)))
    if values.max() > 0 and not out.any():
        raise Rejected("label outside image: no labelled voxel falls inside the image in physical space")
    return out


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name beside ``path``, then rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _process(item: Item, cfg: PreprocessConfig, out_dir: Path, row: dict, salt: str | None) -> None:
    """Fill ``row`` and write the arrays of an accepted item. Raises Rejected."""
    if item.kind == "dicom":
        row.update(dicom_fields(item, salt))
        check_dicom_series(item)
    canonical = to_canonical(read_checked(item, cfg.max_voxels))
    row["spacing_mm"] = list(canonical.GetSpacing()[::-1])
    row["source_shape"] = list(canonical.GetSize()[::-1])
    volume_hu, grid = resample_hu_int16(canonical, cfg.target_spacing_zyx_mm, HU_RANGE)
    del canonical
    label = label_on_grid(item.label, grid) if item.label else None
    mask = body_mask(volume_hu, cfg.body_threshold_hu, spacing_zyx_mm=cfg.target_spacing_zyx_mm)
    if not mask.any():
        raise Rejected(f"no body: no connected region above {cfg.body_threshold_hu} HU")
    margin = tuple(math.ceil(CROP_MARGIN_MM / s) for s in cfg.target_spacing_zyx_mm)
    box = bbox_zyx(mask, margin)
    row["hu_hist_body"] = hu_histogram(volume_hu[box], mask[box]).tolist()
    arrays = {"image_path": ("volumes", volume_hu[box]), "mask_path": ("masks", mask[box].view(np.uint8))}
    if label is not None:
        arrays["label_path"] = ("labels", label[box])
    for column, (folder, array) in arrays.items():
        rel = f"{folder}/{item.item_id}.npy"
        save_npy_atomic(out_dir / rel, array)   # np.save writes a non-contiguous view without a full copy
        row[column] = rel
    row.update(shape=list(volume_hu[box].shape), origin_xyz_mm=list(grid.point([b.start for b in box[::-1]])),
               has_label=label is not None)


def split_dicom_folder(item: Item) -> tuple[list[Item], list[tuple[str, str]]]:
    """A ``dicom-folder`` item as one ``dicom`` item per series (slices in order along the normal; the label
    goes with the largest series) and the (relative path, reason) of its files that are not DICOM images.
    Sources: the folder, or ``folder#<SeriesInstanceUID>`` (``#nouid``, ``.g<geometry>``) when it holds
    several series."""
    series, unreadable = split_series(item.local_files())
    rel = {str(Path(item.root) / f): f for f in item.files}
    items = []
    for s, name in zip(series, series_labels(series)):
        source = item.source + (f"#{name}" if name else "")
        label = item.label if not items else None
        files = [rel[f] for f in s.files] + ([rel[label]] if label else [])
        items.append(Item(make_item_id(source), source, tuple(files), item.image, label, "dicom",
                          s.uid or None, item.root))
    skipped = [(rel[p], "not a readable DICOM image (no DICOM header, or a damaged one)") for p in unreadable]
    return items, skipped


def preprocess_item(item: Item | dict, cfg: PreprocessConfig, out_dir: str | Path,
                    salt: str | None = None) -> dict:
    """Preprocess one item into ``out_dir`` and return its manifest row (plain JSON-able dict).

    Writes ``volumes/<item_id>.npy`` (int16 HU in [-1024, 3071], (Z, Y, X), canonical LPS, spacing
    ``cfg.target_spacing_zyx_mm``, cropped to the body box + 10 mm), ``masks/<item_id>.npy`` (uint8 0/1 body
    mask) and ``labels/<item_id>.npy`` (uint8 BTCV label, nearest neighbour in physical space) when the
    item has a label. ``salt``: of ``patient_key`` (default ANATDIFF_PHI_SALT). A ``dicom-folder`` item must
    hold a single series (``preprocess_unit`` handles several). Never raises for a bad input: the row gets
    status "rejected" and a one-line reason.
    """
    item = Item.from_dict(item) if isinstance(item, dict) else item
    if item.kind == DICOM_FOLDER:
        series, _ = split_dicom_folder(item)
        if len(series) == 1:
            item = replace(series[0], item_id=item.item_id, source=item.source)
    row = empty_row(item_id=item.item_id, source=item.source, files=list(item.files), kind=item.kind,
                    target_spacing_mm=[float(s) for s in cfg.target_spacing_zyx_mm], status="accepted",
                    scanner_key="unknown", has_label=item.label is not None)
    try:
        if item.kind == DICOM_FOLDER:
            raise Rejected("several series: this folder holds no single DICOM series; use preprocess_unit")
        _process(item, cfg, Path(out_dir), row, salt)
    except Rejected as e:
        row.update(status="rejected", reason=str(e))
    except MemoryError:
        row.update(status="rejected", reason="out of memory: the volume is too large for this worker")
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a corpus; the reason says what broke
        row.update(status="rejected", reason=f"error: {type(e).__name__}: {one_line(e)}")
    if row["status"] == "rejected":
        row.update(image_path=None, mask_path=None, label_path=None, shape=None, origin_xyz_mm=None,
                   hu_hist_body=None)
    return row


def preprocess_unit(item: Item | dict, cfg: PreprocessConfig, out_dir: str | Path,
                    salt: str | None = None) -> list[dict]:
    """Manifest rows of one discovered item: a ``dicom-folder`` gives one row per series plus a skipped row
    per non-DICOM file; any other item its single ``preprocess_item`` row. Together the rows' ``files``
    are exactly the item's ``files``."""
    item = Item.from_dict(item) if isinstance(item, dict) else item
    if item.kind != DICOM_FOLDER:
        return [preprocess_item(item, cfg, out_dir, salt)]
    series, skipped = split_dicom_folder(item)
    rows = [preprocess_item(s, cfg, out_dir, salt) for s in series]
    if item.label and not series:
        skipped.append((item.files[-1], "label without image (its DICOM folder holds no readable series)"))
    return rows + [skipped_row(rel, reason) for rel, reason in skipped]
