"""DICOM by content: one header pass over a folder's files, grouped into series; the other files classified.

Each file's header is read once (GDCM through SimpleITK, no pixel data): ``split_series`` keeps the fields in
``HEADER_TAGS`` and nothing else, so the series found there is exactly what is read afterwards (no second
listing by GDCM). Files are grouped by SeriesInstanceUID *and* geometry (orientation, rows x columns, pixel
spacing): GDCM's own grouping puts every file with an EMPTY SeriesInstanceUID (anonymized exports) into one
series. Slices are sorted by their position along the slice normal.

A file GDCM cannot read is classified by its first bytes (``sniff``): no DICOM header (a note, a picture),
a DICOM object without an image (DICOMDIR, structured report, presentation state), or a damaged DICOM file
(empty, unreadable, cut short). A damaged file belongs to the series named by the SeriesInstanceUID found in its
bytes, else to the folder's only series; that series is then rejected naming it (one cause, one place).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: every DICOM field anatdiff reads (name -> "group|element"); PatientID is hashed at once, nothing else of
#: the patient is read
HEADER_TAGS: dict[str, str] = {
    "SeriesInstanceUID": "0020|000e", "SOPInstanceUID": "0008|0018", "SOPClassUID": "0008|0016",
    "Modality": "0008|0060", "ImageType": "0008|0008", "ImageOrientationPatient": "0020|0037",
    "ImagePositionPatient": "0020|0032", "NumberOfFrames": "0028|0008", "RescaleSlope": "0028|1053",
    "RescaleIntercept": "0028|1052", "GantryDetectorTilt": "0018|1120", "Manufacturer": "0008|0070",
    "ManufacturerModelName": "0008|1090", "ConvolutionKernel": "0018|1210", "SliceThickness": "0018|0050",
    "KVP": "0018|0060", "ContrastBolusAgent": "0018|0010", "PatientID": "0010|0020",
    "PatientIdentityRemoved": "0012|0062",
}
#: SOP classes of DICOM objects without an image (prefix -> name)
NO_IMAGE_CLASSES = {
    "1.2.840.10008.1.3.10": "media directory (DICOMDIR)",
    "1.2.840.10008.5.1.4.1.1.88.": "structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.66": "raw data or registration",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
_SNIFF_BYTES = 1 << 16
_UID = re.compile(rb"[0-9.]{1,64}")


def _floats(text: str | None, n: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in (text or "").replace(" ", "").split("\\") if v != "")
    except ValueError:
        return None
    return values if len(values) == n else None


@dataclass(frozen=True)
class SliceHeader:
    """The ``HEADER_TAGS`` of one DICOM file (stripped strings, '' when absent), its size (x, y, frames) and
    pixel spacing (x, y) in mm, as GDCM reads them."""

    path: str
    tags: dict[str, str]
    size_xyz: tuple[int, int, int]
    spacing_xy_mm: tuple[float, float]

    @property
    def uid(self) -> str:
        return self.tags["SeriesInstanceUID"]

    @property
    def orientation(self) -> tuple[float, ...] | None:
        """(6,) direction cosines of the rows and columns (LPS)."""
        return _floats(self.tags["ImageOrientationPatient"], 6)

    @property
    def position_mm(self) -> tuple[float, ...] | None:
        """(3,) LPS position of the first voxel (mm)."""
        return _floats(self.tags["ImagePositionPatient"], 3)

    @property
    def frames(self) -> int:
        n = _floats(self.tags["NumberOfFrames"], 1)
        return max(int(n[0]) if n else 1, self.size_xyz[2])

    @property
    def rescale(self) -> tuple[float, float]:
        """(slope, intercept): HU = stored * slope + intercept."""
        slope, intercept = _floats(self.tags["RescaleSlope"], 1), _floats(self.tags["RescaleIntercept"], 1)
        return (slope[0] if slope else 1.0), (intercept[0] if intercept else 0.0)


@dataclass(frozen=True)
class Series:
    """One series: ``headers`` sorted along the slice normal, ``positions_mm`` (N,) their position along it
    (None when a slice lacks ImagePositionPatient / ImageOrientationPatient), ``damaged``: (path, what is
    wrong) of files of this series that could not be read."""

    uid: str
    geometry_key: str
    headers: tuple[SliceHeader, ...]
    positions_mm: tuple[float, ...] | None
    damaged: tuple[tuple[str, str], ...] = field(default=())

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(h.path for h in self.headers)

    @property
    def image_types(self) -> tuple[str, ...]:
        return tuple(h.tags["ImageType"] for h in self.headers)


def read_slice_header(path: str | Path) -> SliceHeader | None:
    """The ``HEADER_TAGS`` of one file (GDCM, no pixel data); None when GDCM cannot read it as an image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.SetImageIO("GDCMImageIO")
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    keys = set(reader.GetMetaDataKeys())
    if reader.GetDimension() < 2:
        return None
    tags = {name: reader.GetMetaData(tag).strip().rstrip("\0") if tag in keys else ""
            for name, tag in HEADER_TAGS.items()}
    size = (list(reader.GetSize()) + [1])[:3]
    return SliceHeader(str(path), tags, tuple(int(s) for s in size),
                       tuple(round(float(s), 4) for s in reader.GetSpacing()[:2]))


def _meta_sop_class(head: bytes) -> str | None:
    """MediaStorageSOPClassUID (0002,0002) from the file meta group after the 'DICM' magic (explicit VR LE)."""
    pos = 132
    while pos + 8 <= len(head):
        group, element = int.from_bytes(head[pos:pos + 2], "little"), int.from_bytes(head[pos + 2:pos + 4], "little")
        if group != 0x0002:
            return None
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
            length, start = int.from_bytes(head[pos + 8:pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(head[pos + 6:pos + 8], "little"), pos + 8
        if element == 0x0002:
            return head[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    return None


def _find_uid(head: bytes, group: int, element: int) -> str | None:
    """The UID value of element (group, element) found in raw bytes (explicit or implicit VR little endian)."""
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    for m in re.finditer(re.escape(tag), head):
        at = m.end()
        if head[at:at + 2] == b"UI":
            length, start = int.from_bytes(head[at + 2:at + 4], "little"), at + 4
        else:
            length, start = int.from_bytes(head[at:at + 4], "little"), at + 4
        value = head[start:start + length].rstrip(b"\0 ")
        if 0 < length <= 64 and _UID.fullmatch(value):
            return value.decode()
    return None


def sniff(path: str | Path) -> tuple[str, str, str | None]:
    """(kind, what, SeriesInstanceUID or None) of a file GDCM could not read, from its first 64 KiB.

    kind ``not-dicom``: no DICOM header; ``no-image``: a DICOM object without pixels (``what`` names it);
    ``damaged``: empty, unreadable, or DICOM that cannot be read (``what`` says which).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        return "damaged", f"cannot be read ({e.strerror or type(e).__name__})", None
    if size == 0:
        return "damaged", "is empty (0 bytes)", None
    magic = head[128:132] == b"DICM"
    sop = _meta_sop_class(head) if magic else None
    sop = sop or _find_uid(head, 0x0008, 0x0016)
    raw = (len(head) >= 8 and int.from_bytes(head[:2], "little") in (0x0002, 0x0008)
           and int.from_bytes(head[2:4], "little") < 0x0100)
    if not (magic or raw or sop):
        return "not-dicom", "no DICOM header", None
    for prefix, name in NO_IMAGE_CLASSES.items():
        if sop and (sop == prefix or (prefix.endswith(".") and sop.startswith(prefix))):
            return "no-image", name, None
    return "damaged", _damage(head, size), _find_uid(head, 0x0020, 0x000E)


def _damage(head: bytes, size: int) -> str:
    """What is wrong with a DICOM file GDCM cannot read: cut inside its pixel data, or otherwise damaged."""
    at = head.find(b"\xe0\x7f\x10\x00")                      # PixelData (7FE0,0010)
    if at >= 0:
        explicit = head[at + 4:at + 6] in (b"OW", b"OB")
        start = at + (12 if explicit else 8)
        length = int.from_bytes(head[start - 4:start], "little")
        if length != 0xFFFFFFFF and start + length > size:
            return f"is cut short ({size - start} of {length} pixel bytes present)"
    return "is a damaged DICOM file that cannot be read"


def _geometry_key(h: SliceHeader) -> str:
    orient = tuple(round(v, 3) for v in h.orientation) if h.orientation else None
    return hashlib.sha1(repr((orient, h.size_xyz[:2], h.spacing_xy_mm)).encode()).hexdigest()[:8]


def slice_normal(orientation) -> np.ndarray:
    """(3,) unit normal (LPS) of a slice with direction cosines ``orientation`` (6,): row x column."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _sorted_series(uid: str, key: str, headers: list[SliceHeader]) -> Series:
    """Sort slices by position along the normal (cross product of the row and column cosines)."""
    if all(h.orientation and h.position_mm for h in headers):
        normal = slice_normal(headers[0].orientation)
        pos = [float(np.dot(normal, h.position_mm)) for h in headers]
        order = np.argsort(pos, kind="stable")
        return Series(uid, key, tuple(headers[i] for i in order), tuple(pos[i] for i in order))
    return Series(uid, key, tuple(sorted(headers, key=lambda h: h.path)), None)


def _attach_damaged(series: list[Series], damaged: list[tuple[str, str, str | None]]
                    ) -> tuple[list[Series], list[tuple[str, str]]]:
    """Damaged files join the series of their SeriesInstanceUID (the largest one with it), else the folder's
    only series; the others come back as (path, reason) of files whose series is unknown."""
    extra: dict[int, list[tuple[str, str]]] = {}
    unknown = []
    for path, what, uid in damaged:
        idx = next((i for i, s in enumerate(series) if uid and s.uid == uid), None)
        if idx is None and len(series) == 1:
            idx = 0
        if idx is None:
            unknown.append((path, f"damaged DICOM file of an unknown series: it {what}"))
        else:
            extra.setdefault(idx, []).append((path, what))
    out = [Series(s.uid, s.geometry_key, s.headers, s.positions_mm, tuple(sorted(extra.get(i, []))))
           for i, s in enumerate(series)]
    return out, unknown


def split_series(paths: list[str | Path]) -> tuple[list[Series], list[tuple[str, str]]]:
    """(series, skipped) of a folder's files, reading each file's header once.

    Series are grouped by (SeriesInstanceUID, geometry), largest first, each with its damaged files.
    ``skipped``: (path, reason) of files without a DICOM header, DICOM objects without an image, and damaged
    files whose series is unknown.
    """
    groups: dict[tuple[str, str], list[SliceHeader]] = {}
    skipped, damaged = [], []
    for p in paths:
        h = read_slice_header(p)
        if h is not None:
            groups.setdefault((h.uid, _geometry_key(h)), []).append(h)
            continue
        kind, what, uid = sniff(p)
        if kind == "not-dicom":
            suffix = "".join(Path(p).suffixes[-2:]) or "no extension"
            skipped.append((str(p), f"not an image file ({what}; {suffix})"))
        elif kind == "no-image":
            skipped.append((str(p), f"DICOM without an image ({what})"))
        else:
            damaged.append((str(p), what, uid))
    series = [_sorted_series(uid, key, hs) for (uid, key), hs in groups.items()]
    series = sorted(series, key=lambda s: (-len(s.headers), s.uid, s.geometry_key))
    series, unknown = _attach_damaged(series, damaged)
    return series, skipped + unknown


def series_labels(series: list[Series]) -> list[str]:
    """A short name per series, unique within the folder: its UID (``nouid`` if empty), plus ``.g<geometry>``
    when that is not unique. Empty strings when the folder holds a single series."""
    if len(series) == 1:
        return [""]
    base = [s.uid or "nouid" for s in series]
    return [b if base.count(b) == 1 else f"{b}.g{s.geometry_key}" for b, s in zip(base, series)]


def series_geometry(series: Series) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin xyz mm, spacing xyz mm, direction (9,) row-major) of the volume the slices of ``series`` form,
    from the header pass: origin = the first slice's position; x, y = its rows and columns; z = the mean step
    from slice to slice. A gantry-tilted series steps off the slice normal: its z direction is that step
    (a sheared, non-orthogonal grid that ``to_canonical`` resamples exactly). Needs >= 2 slices with
    positions (checked before)."""
    first = series.headers[0]
    o = np.asarray(first.orientation, dtype=np.float64)
    p = np.asarray([h.position_mm for h in series.headers], dtype=np.float64)
    step = (p[-1] - p[0]) / (len(p) - 1)
    z = step / np.linalg.norm(step)
    direction = np.stack([o[:3], o[3:], z], axis=1)
    spacing = (first.spacing_xy_mm[0], first.spacing_xy_mm[1], float(np.linalg.norm(step)))
    return tuple(float(v) for v in p[0]), tuple(float(s) for s in spacing), tuple(float(v) for v in direction.ravel())


def off_line_mm(series: Series) -> float:
    """Largest distance (mm) of a slice position from the straight line through the first and last slices
    (0 for a regular stack, tilted or not)."""
    p = np.asarray([h.position_mm for h in series.headers], dtype=np.float64)
    t = np.linspace(0.0, 1.0, len(p))[:, None]
    return float(np.max(np.linalg.norm(p - (p[0] + t * (p[-1] - p[0])), axis=1)))


def tilt_deg(series: Series) -> float:
    """Angle (degrees) between the slice-to-slice step and the slice normal: the gantry tilt."""
    _, _, d = series_geometry(series)
    z = np.asarray(d).reshape(3, 3)[:, 2]
    return float(np.degrees(np.arccos(min(1.0, abs(float(np.dot(z, slice_normal(series.headers[0].orientation))))))))
