"""Reading CT images (NIfTI, NRRD, MetaImage, DICOM series) with SimpleITK, headers before pixels.

Everything returned is ITK's LPS physical space; array order conversions happen at the callers.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: DICOM tags read by ``read_dicom_tags``: name -> "group|element"
DICOM_TAGS: dict[str, str] = {
    "Modality": "0008|0060",
    "Manufacturer": "0008|0070",
    "ManufacturerModelName": "0008|1090",
    "ConvolutionKernel": "0018|1210",
    "SliceThickness": "0018|0050",
    "KVP": "0018|0060",
    "ContrastBolusAgent": "0018|0010",
    "ImageType": "0008|0008",
    "PatientID": "0010|0020",
}
#: the only patient-identifying tag ever read: it is hashed into ``patient_key`` at once and never stored


def dicom_files(path: str | Path, series_uid: str | None = None) -> list[str]:
    """Slice files of the DICOM series in folder ``path`` (sorted by GDCM); a file path gives itself.

    Raises ValueError when the folder holds no series, or several and ``series_uid`` does not pick one.
    """
    path = Path(path)
    if path.is_file():
        return [str(path)]
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if series_uid is None:
        if len(uids) != 1:
            raise ValueError(f"DICOM folder '{path}' holds {len(uids)} series; pass series_uid (one of {uids})")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise ValueError(f"DICOM folder '{path}' has no series '{series_uid}' (found {uids})")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_uid))


def _series_files(path: Path, series_uid: str | None, files: list[str] | None) -> list[str]:
    if files:
        return [str(f) for f in files]
    return dicom_files(path, series_uid) if path.is_dir() else [str(path)]


def read_header(path: str | Path, series_uid: str | None = None, files: list[str] | None = None) -> dict:
    """Geometry without reading pixels: ``dimension``, ``size_xyz`` (voxels, a DICOM series' z = its file
    count), ``spacing_xyz_mm`` (a series' z spacing is its first slice's), ``components`` per voxel.
    ``files``: the slice files of a DICOM series in order (else GDCM lists the folder ``path``).

    Raises RuntimeError (ITK) / ValueError for an unreadable file.
    """
    path = Path(path)
    files = _series_files(path, series_uid, files)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    size = list(reader.GetSize())
    if path.is_dir():
        size = (size + [1])[:3]
        size[2] = len(files) if size[2] == 1 else size[2] * len(files)
    return {"dimension": len(size), "size_xyz": tuple(int(s) for s in size),
            "spacing_xyz_mm": tuple(float(s) for s in reader.GetSpacing()),
            "components": int(reader.GetNumberOfComponents())}


def read_image(path: str | Path, series_uid: str | None = None, files: list[str] | None = None) -> sitk.Image:
    """The image at ``path``: a file (NIfTI, NRRD, MHA/MHD, one DICOM file) or a DICOM series folder
    (``files``: its slice files in order, else GDCM's listing of the folder).

    Note: SimpleITK's NIfTI reader turns NaN voxels into 0; use ``nifti_nonfinite_count`` to detect them.
    """
    path = Path(path)
    if not path.is_dir():
        return sitk.ReadImage(str(path))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_series_files(path, series_uid, files))
    return reader.Execute()


def read_dicom_tags(path: str | Path, series_uid: str | None = None,
                    files: list[str] | None = None) -> dict[str, str | None]:
    """``DICOM_TAGS`` of the first slice of a series (or of one file): name -> stripped string or None."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(_series_files(Path(path), series_uid, files)[0])
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())
    return {name: (reader.GetMetaData(tag).strip() or None) if tag in keys else None
            for name, tag in DICOM_TAGS.items()}


# NIfTI datatype codes of float voxels -> numpy dtype (little endian; swapped for big-endian files)
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}


def nifti_nonfinite_count(path: str | Path) -> int:
    """Number of NaN/Inf voxels stored in a NIfTI-1/-2 file (0 for integer data), read from the raw bytes.

    SimpleITK replaces NaN with 0 on read, so a float NIfTI has to be checked like this.
    Raises ValueError when the file is not NIfTI.
    """
    path = Path(path)
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
        endian, datatype, _, offset = _nifti_header(f.read(540), path)
        if datatype not in _NIFTI_FLOATS:
            return 0
        f.seek(offset)
        data = np.frombuffer(f.read(), dtype=endian + _NIFTI_FLOATS[datatype])
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def _nifti_header(head: bytes, path: Path) -> tuple[str, int, int, int]:
    """(endian, datatype code, expected data bytes, vox_offset) from the first 540 bytes of a NIfTI-1/-2 file.
    Raises ValueError when the file is not NIfTI."""
    endian = next((e for e in "<>" if len(head) >= 4 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None)
    if endian is None:
        raise ValueError(f"'{path}' is not a NIfTI file (header size field {head[:4]!r})")
    if struct.unpack(endian + "i", head[:4])[0] == 348:
        datatype = struct.unpack(endian + "h", head[70:72])[0]
        dims = struct.unpack(endian + "8h", head[40:56])
        bitpix = struct.unpack(endian + "h", head[72:74])[0]
        offset = int(struct.unpack(endian + "f", head[108:112])[0])
    else:
        datatype = struct.unpack(endian + "h", head[12:14])[0]
        bitpix = struct.unpack(endian + "h", head[14:16])[0]
        dims = struct.unpack(endian + "8q", head[16:80])
        offset = struct.unpack(endian + "q", head[168:176])[0]
    expected = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(int(dims[0]), 1)]])) * bitpix // 8
    return endian, datatype, expected, offset


def _gzip_isize(path: Path) -> int | None:
    """The gzip trailer's ISIZE (uncompressed size mod 2**32 of the last member), None for a tiny file."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 18:
            return None
        f.seek(-4, 2)
        return struct.unpack("<I", f.read(4))[0]


def nifti_data_bytes(path: str | Path) -> tuple[int, int]:
    """(bytes the NIfTI-1/-2 header promises after its vox_offset, bytes actually stored there).

    SimpleITK reads a truncated ``.nii`` or ``.nii.gz`` without complaint (the missing voxels come back as
    0), so compare the two. ``.nii``: the file size. ``.nii.gz``: when the gzip trailer's ISIZE equals
    (vox_offset + expected) mod 2**32 the stream is whole (a cut stream ends in compressed bytes that match
    by chance with probability 2**-32), without decompressing; otherwise the stream is decompressed to count
    what it yields (a cut stream counts what it yielded). Raises ValueError when the file is not NIfTI.
    """
    path = Path(path)
    gz = path.name.lower().endswith(".gz")
    with (gzip.open if gz else open)(path, "rb") as f:
        _, _, expected, offset = _nifti_header(f.read(540), path)
        if not gz:
            return expected, max(path.stat().st_size - offset, 0)
        if _gzip_isize(path) == (offset + expected) % 2 ** 32:
            return expected, expected
        f.seek(0)
        stored = 0
        try:
            while chunk := f.read(1 << 22):
                stored += len(chunk)
        except (EOFError, OSError):  # a cut gzip stream (gzip.BadGzipFile is an OSError)
            pass
    return expected, max(stored - offset, 0)
