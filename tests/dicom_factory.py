"""Hand-made DICOM files for the ingestion tests (pydicom): CT slices with any tags, rescale and geometry,
an enhanced multi-frame CT, a structured report (no pixels), a DICOMDIR-like index.

Pixel values are stored values; HU = stored * RescaleSlope + RescaleIntercept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _file_dataset(sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def _pixels(ds: Dataset, stored: np.ndarray) -> None:
    stored = np.asarray(stored, dtype=np.int16)
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = stored.tobytes()


def write_ct_slice(path: Path, stored_yx: np.ndarray, position_mm, series_uid: str, *, orientation=AXIAL,
                   spacing_yx_mm=(1.0, 1.0), slope: float = 1.0, intercept: float = 0.0, modality: str = "CT",
                   instance: int = 1, sop_uid: str | None = None, tags: dict | None = None) -> Path:
    """One single-frame CT (or ``modality``) slice; ``tags``: extra keyword -> value (e.g. PatientName)."""
    ds = _file_dataset(CT_IMAGE, sop_uid or generate_uid())
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, "1.2.826.0.1.3680043.10.1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel = "ACME", "Scan 64", "B30f"
    ds.KVP, ds.SliceThickness = "120", "2.0"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position_mm]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing_yx_mm]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    for key, value in (tags or {}).items():
        setattr(ds, key, value)
    _pixels(ds, stored_yx)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, stored_zyx: np.ndarray, *, step_mm=2.0, series_uid: str | None = None,
                    names=None, step_vector_mm=None, **kw) -> list[Path]:
    """One file per z slice at ``k * step_vector_mm`` (default (0, 0, step_mm)); file names ``names[k]``
    (default ``IM%04d``, no extension, as many PACS exports)."""
    series_uid = series_uid or generate_uid()
    step = np.asarray(step_vector_mm if step_vector_mm is not None else (0.0, 0.0, step_mm), dtype=float)
    names = names or [f"IM{k + 1:04d}" for k in range(len(stored_zyx))]
    return [write_ct_slice(folder / names[k], stored_zyx[k], k * step, series_uid, instance=k + 1, **kw)
            for k in range(len(stored_zyx))]


def write_enhanced_ct(path: Path, stored_zyx: np.ndarray, step_mm: float = 2.0) -> Path:
    """One Enhanced CT Image Storage file holding every slice as a frame (per-frame positions)."""
    ds = _file_dataset(ENHANCED_CT_IMAGE, generate_uid())
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(stored_zyx)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(AXIAL)
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [1.0, 1.0]
    shared.PixelMeasuresSequence[0].SliceThickness = step_mm
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(len(stored_zyx)):
        f = Dataset()
        f.PlanePositionSequence = Sequence([Dataset()])
        f.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, k * step_mm]
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    _pixels(ds, stored_zyx)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dose_report(path: Path, series_uid: str | None = None) -> Path:
    """A radiation dose structured report: a DICOM object without pixel data (modality SR)."""
    ds = _file_dataset(DOSE_SR, generate_uid())
    ds.Modality, ds.SeriesInstanceUID = "SR", series_uid or generate_uid()
    ds.ValueType = "CONTAINER"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir_stub(path: Path) -> Path:
    """A media directory file (``DICOMDIR``) as exported on CDs; its records are not needed by anatdiff."""
    ds = _file_dataset(MEDIA_DIRECTORY, generate_uid())
    ds.FileSetID = "EXPORT"
    del ds.SOPClassUID, ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
