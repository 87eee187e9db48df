"""Preprocess one CT item: QC, canonical orientation, resampling, body crop, int16 HU + masks on disk.

``preprocess_item`` / ``preprocess_unit`` never raise for a bad input: they return manifest rows with status
"rejected" and a one-line reason whose prefix (before ':') names the rule. A reason never holds a path: it
names an input file as "file k of n" (k-th of the row's ``files``, as numbered in ``OUT/private/sources.csv``;
with ``readable_ids`` its name follows in brackets).

A DICOM folder is split into series by one header pass (``pipeline.io.dicom.split_series``); the series found
there is the one whose pixels are read, with the geometry of that pass (``series_geometry``).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.config import PreprocessConfig
from pipeline.data.patches import volume_digest
from pipeline.ingest.body import bbox_zyx, body_mask
from pipeline.ingest.geometry import Grid, resample_hu_int16, resample_label_onto, to_canonical
from pipeline.ingest.manifest import empty_row, skipped_row
from pipeline.ingest.phi import patient_key, resolve_secret, scanner_key
from pipeline.ingest.qc import (MIN_SLICES, Rejected, check_complete, check_ct_intensity, check_header,
                                check_localizer, check_multiframe, check_nifti_geometry, check_pixels,
                                check_slice_positions)
from pipeline.ingest.report import hu_histogram
from pipeline.io.atomic import write_atomic
from pipeline.io.dicom import Series, off_line_mm, series_geometry, series_labels, split_series
from pipeline.io.layouts import DICOM_FOLDER, Item, derived_item_id
from pipeline.io.readers import (itk_affine_ras, nifti_affines, nifti_best_affine, nifti_data_bytes,
                                 nifti_nonfinite_count, read_header, read_image, read_nifti_header)
from pipeline.labels import NUM_ORGANS

__all__ = ["MIN_SLICES", "Rejected", "check_header", "preprocess_item", "preprocess_unit", "split_dicom_folder"]

HU_RANGE = (-1024, 3071)
#: body box margin on each side, in mm
CROP_MARGIN_MM = 10.0
#: an image file shorter than this cannot hold a header
MIN_IMAGE_BYTES = 32


def one_line(err: BaseException, limit: int = 240) -> str:
    """An exception as one short line, without ITK's build-path noise."""
    text = re.sub(r"/\S*(SimpleITK|ITK)\S*:\d+:\s*", "", str(err))
    text = " ".join(text.split()) or type(err).__name__
    return text[:limit]


def file_labels(item: Item, readable: bool = False) -> dict[str, str]:
    """Local path -> "file k of n" (plus the name with ``readable``) for the files of ``item``; its root ->
    '<input>'."""
    n = len(item.files)
    out = {str(Path(item.root) / f): f"file {k} of {n}" + (f" ({Path(f).name})" if readable else "")
           for k, f in enumerate(item.files, start=1)}
    if item.root:
        out[str(item.root)] = "<input>"
    return out


def public_text(text: str, labels: dict[str, str]) -> str:
    """``text`` with each path of ``labels`` replaced by its label and any other absolute path by '<path>'."""
    for path in sorted(labels, key=len, reverse=True):
        text = text.replace(path, labels[path])
    return re.sub(r"(?<![\w<])/[^\s'\",;)]+", "<path>", text)


def _number(text: str | None) -> float | None:
    try:
        return float(text.split("\\")[0]) if text else None
    except ValueError:
        return None


def dicom_fields(tags: dict[str, str], secret: str | None) -> dict:
    """Manifest fields from a series' first header: modality, scanner_key (manufacturer|model|kernel),
    slice_thickness_mm, kvp, contrast, patient_key (HMAC of PatientID; ``unkeyed_patient`` instead when
    PatientID is present, not declared de-identified and ``secret`` is None). Raises Rejected if not CT."""
    modality = tags["Modality"] or "unknown"
    if modality != "CT":
        raise Rejected(f"not CT: modality {modality}")
    fields = {"modality": modality, "scanner_key": scanner_key(tags),
              "slice_thickness_mm": _number(tags["SliceThickness"]), "kvp": _number(tags["KVP"]),
              "contrast": bool(tags["ContrastBolusAgent"])}
    pid = tags["PatientID"] or None
    if pid and secret is None and tags["PatientIdentityRemoved"].upper() != "YES":
        fields["unkeyed_patient"] = True
    else:
        fields["patient_key"] = patient_key(pid, secret)
    return fields


def slices_key(series: Series) -> str:
    """Fingerprint of a series' slices: its SOP Instance UIDs (else positions), to find copies of it."""
    sop = sorted(h.tags["SOPInstanceUID"] for h in series.headers)
    parts = sop if all(sop) else [repr(h.position_mm) for h in series.headers]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def read_series(series: Series, max_voxels: int) -> sitk.Image:
    """Series QC from the header pass, then the pixels of exactly its files, with its geometry. Raises Rejected.

    Slices with different RescaleSlope / RescaleIntercept are read as float32 (each slice rescaled with its
    own values); a gantry-tilted series gets its sheared grid (``series_geometry``)."""
    first = series.headers[0]
    check_multiframe(max(h.frames for h in series.headers), first.tags["SOPClassUID"])
    check_localizer(series.image_types)
    check_slice_positions(series.positions_mm)
    spacing_min = min(first.spacing_xy_mm)
    if off_line_mm(series) > 0.5 * spacing_min:
        raise Rejected(f"irregular slice positions: a slice lies {off_line_mm(series):.2f} mm off the line through "
                       "the first and last slices")
    origin, spacing, direction = series_geometry(series)
    size = (first.size_xyz[0], first.size_xyz[1], len(series.headers))
    check_header({"dimension": 3, "size_xyz": size, "spacing_xyz_mm": spacing, "components": 1}, max_voxels)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    if len({h.rescale for h in series.headers}) > 1:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    if image.GetSize() != size or image.GetNumberOfComponentsPerPixel() != 1:
        raise Rejected(f"inconsistent pixels: the slices read as {image.GetSize()} with "
                       f"{image.GetNumberOfComponentsPerPixel()} components, the headers say {size}, 1")
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    check_pixels(image)
    return image


def _check_file(path: Path, kind: str) -> None:
    """An image file that cannot be opened or is too short to hold a header. Raises Rejected."""
    if not os.access(path, os.R_OK):
        raise Rejected("unreadable: permission denied")
    size = path.stat().st_size
    if size < MIN_IMAGE_BYTES:
        raise Rejected("unreadable: empty file (0 bytes)" if size == 0 else
                       f"unreadable: {size} byte{'s' if size > 1 else ''}, too short for a {kind} image")


def _check_nifti(path: Path, header: dict) -> None:
    """NIfTI geometry by the NIfTI rules (sform, qform, pixdim) and its stored bytes. Raises Rejected."""
    h = read_nifti_header(path)
    source, _ = nifti_best_affine(h)
    check_nifti_geometry(source, nifti_affines(h), header["size_xyz"], itk_affine_ras(header))
    check_complete(*nifti_data_bytes(path))


def read_checked(item: Item, max_voxels: int) -> sitk.Image:
    """Header QC, then pixels, then pixel QC, for an image file (NIfTI, NRRD, MHA, one DICOM file). Raises
    Rejected."""
    path = Path(item.image)
    _check_file(path, item.kind)
    labels = file_labels(item)
    try:
        header = read_header(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a property of the file
        raise Rejected(f"unreadable: {public_text(one_line(e), labels)}") from None
    check_header(header, max_voxels)
    if item.kind == "nifti":
        _check_nifti(path, header)
    try:
        image = read_image(path)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable: {public_text(one_line(e), labels)}") from None
    floats = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    check_pixels(image, nifti_nonfinite_count(path) if floats and item.kind == "nifti" else 0)
    if item.kind != "dicom":
        check_ct_intensity(sitk.GetArrayViewFromImage(image))
    return image


def label_on_grid(label_path: str, grid: Grid) -> np.ndarray:
    """(Z, Y, X) uint8 BTCV label sampled onto ``grid`` in physical space. Raises Rejected."""
    try:
        label = read_image(label_path)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"unreadable label: {public_text(one_line(e), {label_path: 'the label'})}") from None
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
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    write_atomic(path, write)


def _damaged(item: Item, series: Series, readable: bool) -> None:
    """A series with files that could not be read is rejected, naming the first of them. Raises Rejected."""
    if not series.damaged:
        return
    labels = file_labels(item, readable)
    path, what = series.damaged[0]
    more = f" ({len(series.damaged) - 1} more damaged)" if len(series.damaged) > 1 else ""
    raise Rejected(f"damaged slice: {labels[path]} of this series {what}{more}")


def _process(item: Item, cfg: PreprocessConfig, out_dir: Path, row: dict, secret: str | None,
             series: Series | None = None) -> None:
    """Fill ``row`` and write the arrays of an accepted item. Raises Rejected."""
    if series is not None:
        row.update(series_uid=series.uid or None, slices_key=slices_key(series))
        _damaged(item, series, cfg.readable_ids)
        row.update(dicom_fields(series.headers[0].tags, secret))
        image = read_series(series, cfg.max_voxels)
    else:
        image = read_checked(item, cfg.max_voxels)
    canonical = to_canonical(image)
    del image
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
               has_label=label is not None, volume_digest=volume_digest(volume_hu[box], cfg.target_spacing_zyx_mm))


def split_dicom_folder(item: Item) -> tuple[list[tuple[Item, Series]], list[tuple[str, str]]]:
    """A ``dicom-folder`` item as one ``dicom`` item per series, with its ``Series`` from the one header pass
    (slices in order along the normal, then its damaged files; the label goes with the largest series), and
    the (relative path, reason) of its files that are no DICOM images. Sources: the folder, or
    ``folder#<SeriesInstanceUID>`` (``#nouid``, ``.g<geometry>``) when it holds several series."""
    series, skipped = split_series(item.local_files())
    rel = {str(Path(item.root) / f): f for f in item.files}
    out = []
    for s, name in zip(series, series_labels(series)):
        label = item.label if not out else None
        files = [rel[f] for f in s.files] + [rel[p] for p, _ in s.damaged] + ([rel[label]] if label else [])
        item_id = derived_item_id(item, name) if name else item.item_id
        out.append((Item(item_id, item.source + (f"#{name}" if name else ""), tuple(files), item.image, label,
                         "dicom", s.uid or None, item.root), s))
    return out, [(rel[p], reason) for p, reason in skipped]


def _row(item: Item, cfg: PreprocessConfig, out_dir: Path, secret: str | None, series: Series | None = None) -> dict:
    """The manifest row of one item (its arrays written when accepted); never raises for a bad input."""
    row = empty_row(item_id=item.item_id, source=item.source, files=list(item.files), kind=item.kind,
                    target_spacing_mm=[float(s) for s in cfg.target_spacing_zyx_mm], status="accepted",
                    scanner_key="unknown", has_label=item.label is not None)
    try:
        if item.kind == DICOM_FOLDER:
            raise Rejected("several series: this folder holds no single DICOM series; use preprocess_unit")
        _process(item, cfg, Path(out_dir), row, secret, series)
    except Rejected as e:
        row.update(status="rejected", reason=str(e))
    except MemoryError:
        row.update(status="rejected", reason="out of memory: the volume is too large for this worker")
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a corpus; the reason says what broke
        row.update(status="rejected",
                   reason=f"error: {type(e).__name__}: {public_text(one_line(e), file_labels(item))}")
    if row["status"] == "rejected":
        row.update(image_path=None, mask_path=None, label_path=None, shape=None, origin_xyz_mm=None,
                   hu_hist_body=None, volume_digest=None)
    return row


def preprocess_item(item: Item | dict, cfg: PreprocessConfig, out_dir: str | Path,
                    secret: str | None = None) -> dict:
    """Preprocess one item into ``out_dir`` and return its manifest row (plain JSON-able dict).

    Writes ``volumes/<item_id>.npy`` (int16 HU in [-1024, 3071], (Z, Y, X), canonical LPS, spacing
    ``cfg.target_spacing_zyx_mm``, cropped to the body box + 10 mm), ``masks/<item_id>.npy`` (uint8 0/1 body
    mask) and ``labels/<item_id>.npy`` (uint8 BTCV label, nearest neighbour in physical space) when the
    item has a label. ``secret``: of ``patient_key`` (default: ``resolve_secret()``). A ``dicom-folder`` item
    must hold a single series (``preprocess_unit`` handles several). Never raises for a bad input: the row
    gets status "rejected" and a one-line reason.
    """
    item = Item.from_dict(item) if isinstance(item, dict) else item
    secret = secret if secret is not None else resolve_secret()
    if item.kind != DICOM_FOLDER:
        return _row(item, cfg, Path(out_dir), secret)
    series, _ = split_dicom_folder(item)
    if len(series) != 1:
        return _row(item, cfg, Path(out_dir), secret)
    (single, s), = series
    return _row(single, cfg, Path(out_dir), secret, s)


def preprocess_unit(item: Item | dict, cfg: PreprocessConfig, out_dir: str | Path,
                    secret: str | None = None) -> list[dict]:
    """Manifest rows of one discovered item: a ``dicom-folder`` gives one row per series plus a skipped row
    per file that is no DICOM image; any other item its single ``preprocess_item`` row. Together the rows'
    ``files`` are exactly the item's ``files``."""
    item = Item.from_dict(item) if isinstance(item, dict) else item
    secret = secret if secret is not None else resolve_secret()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warnings are replaced by our QC reasons
    if item.kind != DICOM_FOLDER:
        return [preprocess_item(item, cfg, out_dir, secret)]
    series, skipped = split_dicom_folder(item)
    rows = [_row(s_item, cfg, Path(out_dir), secret, s) for s_item, s in series]
    if item.label and not series:
        skipped.append((item.files[-1], "label without image (its DICOM folder holds no readable series)"))
    return rows + [skipped_row(rel, reason) for rel, reason in skipped]
