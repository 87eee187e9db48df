"""Splitting a folder of DICOM files into series, headers only (no pixel data is read).

GDCM's own grouping (``ImageSeriesReader.GetGDCMSeriesIDs``) puts every file with an EMPTY SeriesInstanceUID
(anonymized exports) into one series, even with different geometry; here files are grouped by
SeriesInstanceUID *and* geometry (orientation, rows x columns, pixel spacing), so anonymized series of one
folder separate by geometry. Slices of a group are sorted by their position along the slice normal (mm).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

_TAGS = {"uid": "0020|000e", "orientation": "0020|0037", "position": "0020|0032", "image_type": "0008|0008",
         "modality": "0008|0060"}


@dataclass(frozen=True)
class SliceHeader:
    """Header fields of one DICOM file. ``orientation`` (6,) direction cosines, ``position_mm`` (3,) LPS."""

    path: str
    uid: str
    orientation: tuple[float, ...] | None
    position_mm: tuple[float, ...] | None
    size_xy: tuple[int, int]
    spacing_xy_mm: tuple[float, float]
    image_type: str


@dataclass(frozen=True)
class Series:
    """One series: ``files`` sorted along the normal, ``positions_mm`` (N,) their position along it
    (None when a slice lacks ImagePositionPatient / ImageOrientationPatient), ``image_types`` per file."""

    uid: str
    geometry_key: str
    files: tuple[str, ...]
    positions_mm: tuple[float, ...] | None
    image_types: tuple[str, ...]


def _floats(text: str | None, n: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in (text or "").replace(" ", "").split("\\") if v != "")
    except ValueError:
        return None
    return values if len(values) == n else None


def read_slice_header(path: str | Path) -> SliceHeader | None:
    """The series-relevant header fields of one file; None when it is not a readable DICOM image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.SetImageIO("GDCMImageIO")
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    keys = set(reader.GetMetaDataKeys())
    if reader.GetDimension() < 2 or not ({_TAGS["uid"], _TAGS["modality"]} & keys):
        return None
    get = {name: reader.GetMetaData(tag).strip() if tag in keys else "" for name, tag in _TAGS.items()}
    return SliceHeader(str(path), get["uid"], _floats(get["orientation"], 6), _floats(get["position"], 3),
                       tuple(int(s) for s in reader.GetSize()[:2]),
                       tuple(round(float(s), 4) for s in reader.GetSpacing()[:2]), get["image_type"])


def _geometry_key(h: SliceHeader) -> str:
    orient = tuple(round(v, 3) for v in h.orientation) if h.orientation else None
    return hashlib.sha1(repr((orient, h.size_xy, h.spacing_xy_mm)).encode()).hexdigest()[:8]


def _sorted_series(uid: str, key: str, headers: list[SliceHeader]) -> Series:
    """Sort slices by position along the normal (cross product of the row and column cosines)."""
    if all(h.orientation and h.position_mm for h in headers):
        o = np.asarray(headers[0].orientation)
        normal = np.cross(o[:3], o[3:])
        pos = [float(np.dot(normal, h.position_mm)) for h in headers]
        order = np.argsort(pos, kind="stable")
        return Series(uid, key, tuple(headers[i].path for i in order), tuple(pos[i] for i in order),
                      tuple(headers[i].image_type for i in order))
    headers = sorted(headers, key=lambda h: h.path)
    return Series(uid, key, tuple(h.path for h in headers), None, tuple(h.image_type for h in headers))


def split_series(paths: list[str | Path]) -> tuple[list[Series], list[str]]:
    """(series, unreadable paths) of a list of files: grouped by (SeriesInstanceUID, geometry), largest first.

    A file that is not a readable DICOM image (a DICOMDIR note, a truncated header) is returned as unreadable.
    """
    groups: dict[tuple[str, str], list[SliceHeader]] = {}
    unreadable = []
    for p in paths:
        h = read_slice_header(p)
        if h is None:
            unreadable.append(str(p))
            continue
        groups.setdefault((h.uid, _geometry_key(h)), []).append(h)
    series = [_sorted_series(uid, key, hs) for (uid, key), hs in groups.items()]
    return sorted(series, key=lambda s: (-len(s.files), s.uid, s.geometry_key)), unreadable


def series_labels(series: list[Series]) -> list[str]:
    """A short name per series, unique within the folder: its UID (``nouid`` if empty), plus ``.g<geometry>``
    when that is not unique. Empty strings when the folder holds a single series."""
    if len(series) == 1:
        return [""]
    base = [s.uid or "nouid" for s in series]
    return [b if base.count(b) == 1 else f"{b}.g{s.geometry_key}" for b, s in zip(base, series)]
