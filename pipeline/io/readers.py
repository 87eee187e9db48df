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
    "PatientID": "0010|0020",
}


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


def read_header(path: str | Path, series_uid: str | None = None) -> dict:
    """Geometry without reading pixels: ``dimension``, ``size_xyz`` (voxels, a DICOM series' z = its file
    count), ``spacing_xyz_mm`` (a series' z spacing is its first slice's), ``components`` per voxel.

    Raises RuntimeError (ITK) / ValueError for an unreadable file.
    """
    path = Path(path)
    files = dicom_files(path, series_uid) if path.is_dir() else [str(path)]
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


def read_image(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """The image at ``path``: a file (NIfTI, NRRD, MHA/MHD, one DICOM file) or a DICOM series folder.

    Note: SimpleITK's NIfTI reader turns NaN voxels into 0; use ``nifti_nonfinite_count`` to detect them.
    """
    path = Path(path)
    if not path.is_dir():
        return sitk.ReadImage(str(path))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_files(path, series_uid))
    return reader.Execute()


def read_dicom_tags(path: str | Path, series_uid: str | None = None) -> dict[str, str | None]:
    """``DICOM_TAGS`` of the first slice of a series folder (or of one file): name -> stripped string or None."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(dicom_files(path, series_uid)[0])
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
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        for endian in "<>":
            sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
            if sizeof_hdr in (348, 540):
                break
        else:
            raise ValueError(f"'{path}' is not a NIfTI file (header size field {head[:4]!r})")
        if sizeof_hdr == 348:
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        else:
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            offset = struct.unpack(endian + "q", head[168:176])[0]
        if datatype not in _NIFTI_FLOATS:
            return 0
        f.seek(offset)
        data = np.frombuffer(f.read(), dtype=endian + _NIFTI_FLOATS[datatype])
    return int(data.size - np.count_nonzero(np.isfinite(data)))
