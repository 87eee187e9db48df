"""Preprocess one CT item: QC, canonical orientation, resampling, body crop, int16 HU + masks on disk.

``preprocess_item`` never raises for a bad input: it returns a manifest row with status "rejected" and a
one-line reason whose prefix (before ':') names the rule.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.config import PreprocessConfig
from pipeline.ingest.body import bbox_zyx, body_mask
from pipeline.ingest.geometry import crop_to_bbox, resample_label_onto, resample_to_spacing, to_canonical
from pipeline.ingest.manifest import empty_row, patient_key
from pipeline.io.layouts import Item
from pipeline.io.readers import nifti_nonfinite_count, read_dicom_tags, read_header, read_image
from pipeline.labels import NUM_ORGANS

MIN_SLICES = 8
HU_RANGE = (-1024, 3071)
#: body box margin on each side, in mm
CROP_MARGIN_MM = 10.0
_FLOAT_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64}


class Rejected(Exception):
    """An input that fails a QC rule; the message is the manifest's one-line reason."""


def one_line(err: BaseException, limit: int = 240) -> str:
    """An exception as one short line, without ITK's build-path noise."""
    text = re.sub(r"/\S*(SimpleITK|ITK)\S*:\d+:\s*", "", str(err))
    text = " ".join(text.split()) or type(err).__name__
    return text[:limit]


def check_header(header: dict, max_voxels: int) -> None:
    """QC from the header alone (before any pixel is read). Raises Rejected."""
    size = header["size_xyz"]
    if header["dimension"] == 2 or (header["dimension"] == 3 and 1 in size):
        raise Rejected(f"2-D image: size (x, y, z) {size}")
    if header["dimension"] != 3:
        raise Rejected(f"not a 3-D image: {header['dimension']}-D, size {size}")
    if header["components"] != 1:
        raise Rejected(f"not a scalar image: {header['components']} components per voxel")
    spacing = header["spacing_xyz_mm"]
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise Rejected(f"bad spacing: (x, y, z) {spacing} mm, must be > 0")
    voxels = math.prod(size)
    if voxels > max_voxels:
        raise Rejected(f"too large: {voxels} voxels > max_voxels {max_voxels}")
    if min(size) < MIN_SLICES:
        raise Rejected(f"too few slices: {min(size)} < {MIN_SLICES} (size x, y, z {size})")


def check_pixels(image: sitk.Image, item: Item) -> None:
    """QC of the read image: positive spacing, finite voxels (raw NIfTI bytes too). Raises Rejected."""
    spacing = image.GetSpacing()
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise Rejected(f"bad spacing: (x, y, z) {spacing} mm, must be > 0")
    bad = 0
    if image.GetPixelID() in _FLOAT_TYPES:
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if item.kind == "nifti":
            bad = max(bad, nifti_nonfinite_count(item.image))
    if bad:
        raise Rejected(f"non-finite voxels: {bad} NaN/Inf")


def dicom_fields(item: Item) -> dict:
    """modality, scanner_key, patient_key of a DICOM item (first slice's tags). Raises Rejected if not CT."""
    try:
        tags = read_dicom_tags(item.image, item.series_uid)
    except Exception as e:  # noqa: BLE001 - any reader failure is a property of the file
        raise Rejected(f"unreadable: {one_line(e)}") from None
    modality = tags["Modality"] or "unknown"
    if modality != "CT":
        raise Rejected(f"not CT: modality {modality}")
    parts = [tags["Manufacturer"], tags["ManufacturerModelName"], tags["ConvolutionKernel"]]
    scanner = "|".join(p or "" for p in parts) if any(parts) else "unknown"
    return {"modality": modality, "scanner_key": scanner, "patient_key": patient_key(tags["PatientID"])}


def read_checked(item: Item, max_voxels: int) -> sitk.Image:
    """Header QC, then pixels, then pixel QC. Raises Rejected."""
    try:
        header = read_header(item.image, item.series_uid)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable: {one_line(e)}") from None
    check_header(header, max_voxels)
    try:
        image = read_image(item.image, item.series_uid)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable: {one_line(e)}") from None
    check_pixels(image, item)
    return image


def label_on_grid(label_path: str, reference: sitk.Image) -> np.ndarray:
    """(Z, Y, X) uint8 BTCV label sampled onto ``reference`` in physical space. Raises Rejected."""
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
    out = sitk.GetArrayFromImage(resample_label_onto(sitk.Cast(label, sitk.sitkUInt8), reference))
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


def _process(item: Item, cfg: PreprocessConfig, out_dir: Path, row: dict) -> None:
    """Fill ``row`` and write the arrays of an accepted item. Raises Rejected."""
    if item.kind == "dicom":
        row.update(dicom_fields(item))
    canonical = to_canonical(read_checked(item, cfg.max_voxels))
    row["spacing_mm"] = list(canonical.GetSpacing()[::-1])
    row["source_shape"] = list(canonical.GetSize()[::-1])
    resampled = resample_to_spacing(canonical, cfg.target_spacing_zyx_mm)
    del canonical
    label = label_on_grid(item.label, resampled) if item.label else None
    volume_hu = np.clip(np.rint(sitk.GetArrayViewFromImage(resampled)), *HU_RANGE).astype(np.int16)
    mask = body_mask(volume_hu, cfg.body_threshold_hu)
    if not mask.any():
        raise Rejected(f"no body: no connected region above {cfg.body_threshold_hu} HU")
    margin = tuple(math.ceil(CROP_MARGIN_MM / s) for s in cfg.target_spacing_zyx_mm)
    box = bbox_zyx(mask, margin)
    origin = crop_to_bbox(resampled, box).GetOrigin()
    arrays = {"image_path": ("volumes", volume_hu[box]), "mask_path": ("masks", mask[box].astype(np.uint8))}
    if label is not None:
        arrays["label_path"] = ("labels", label[box])
    for column, (folder, array) in arrays.items():
        rel = f"{folder}/{item.item_id}.npy"
        save_npy_atomic(out_dir / rel, np.ascontiguousarray(array))
        row[column] = rel
    row.update(shape=list(volume_hu[box].shape), origin_xyz_mm=list(origin), has_label=label is not None)


def preprocess_item(item: Item | dict, cfg: PreprocessConfig, out_dir: str | Path) -> dict:
    """Preprocess one item into ``out_dir`` and return its manifest row (plain JSON-able dict).

    Writes ``volumes/<item_id>.npy`` (int16 HU in [-1024, 3071], (Z, Y, X), canonical LPS, spacing
    ``cfg.target_spacing_zyx_mm``, cropped to the body box + 10 mm), ``masks/<item_id>.npy`` (uint8 0/1 body
    mask) and ``labels/<item_id>.npy`` (uint8 BTCV label, nearest neighbour in physical space) when the
    item has a label. Never raises for a bad input: the row gets status "rejected" and a one-line reason.
    """
    item = Item.from_dict(item) if isinstance(item, dict) else item
    row = empty_row(item_id=item.item_id, source=item.source, files=list(item.files), kind=item.kind,
                    target_spacing_mm=[float(s) for s in cfg.target_spacing_zyx_mm], status="accepted",
                    scanner_key="unknown", has_label=item.label is not None)
    try:
        _process(item, cfg, Path(out_dir), row)
    except Rejected as e:
        row.update(status="rejected", reason=str(e))
    except MemoryError:
        row.update(status="rejected", reason="out of memory: the volume is too large for this worker")
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a corpus; the reason says what broke
        row.update(status="rejected", reason=f"error: {type(e).__name__}: {one_line(e)}")
    if row["status"] == "rejected":
        row.update(image_path=None, mask_path=None, label_path=None, shape=None, origin_xyz_mm=None)
    return row
