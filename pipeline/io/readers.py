"""Reading CT images (NIfTI, NRRD, MetaImage, DICOM series) with SimpleITK, headers before pixels, and the
NIfTI header itself (geometry by the NIfTI rules, stored bytes, NaN/Inf) from its raw bytes.

Everything SimpleITK returns is ITK's LPS physical space; NIfTI affines are RAS; array order conversions
happen at the callers. The preprocess job reads DICOM folders through ``pipeline.io.dicom`` (one header pass);
``read_header`` / ``read_image`` on a folder list it with GDCM.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk


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
    count), ``spacing_xyz_mm`` (a series' z spacing is its first slice's), ``origin_xyz_mm`` and ``direction``
    (LPS, as ITK reads them), ``components`` per voxel.
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
            "origin_xyz_mm": tuple(float(s) for s in reader.GetOrigin()),
            "direction": tuple(float(s) for s in reader.GetDirection()),
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


# NIfTI datatype codes of float voxels -> numpy dtype (little endian; swapped for big-endian files)
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}
#: bytes read per step when streaming a NIfTI's voxels
_CHUNK_BYTES = 1 << 22
#: a .nii.gz stream may hold this many bytes beyond what its header promises (padding) before it counts as
#: oversized (a gzip bomb, or a header that understates the data)
NIFTI_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1/-2 header that define the data and its geometry.

    ``dims`` (dim[0], then dim[1..7]); ``pixdim`` (8,) (pixdim[0] = qfac); ``quatern_bcd``, ``qoffset_xyz``
    (mm); ``srow`` (3, 4): the sform rows (RAS mm).
    """

    endian: str
    datatype: int
    bitpix: int
    dims: tuple[int, ...]
    vox_offset: int
    pixdim: tuple[float, ...]
    qform_code: int
    sform_code: int
    quatern_bcd: tuple[float, float, float]
    qoffset_xyz: tuple[float, float, float]
    srow: tuple[tuple[float, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Voxels along each of the dim[0] axes (at least 1)."""
        return tuple(max(int(d), 1) for d in self.dims[1:1 + max(int(self.dims[0]), 1)])

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.bitpix // 8


def parse_nifti_header(head: bytes, path: str | Path = "") -> NiftiHeader:
    """The header in the first 540 bytes of a NIfTI-1/-2 file. Raises ValueError when the file is not NIfTI."""
    endian = next((e for e in "<>" if len(head) >= 4 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None)
    if endian is None or len(head) < 348:
        raise ValueError(f"'{path}' is not a NIfTI file (header size field {head[:4]!r})")
    u = lambda fmt, a, b: struct.unpack(endian + fmt, head[a:b])  # noqa: E731
    if u("i", 0, 4)[0] == 348:
        return NiftiHeader(endian, u("h", 70, 72)[0], u("h", 72, 74)[0], u("8h", 40, 56), int(u("f", 108, 112)[0]),
                           u("8f", 76, 108), u("h", 252, 254)[0], u("h", 254, 256)[0], u("3f", 256, 268),
                           u("3f", 268, 280), (u("4f", 280, 296), u("4f", 296, 312), u("4f", 312, 328)))
    if len(head) < 540:
        raise ValueError(f"'{path}' is a cut NIfTI-2 header ({len(head)} of 540 bytes)")
    return NiftiHeader(endian, u("h", 12, 14)[0], u("h", 14, 16)[0], u("8q", 16, 80), u("q", 168, 176)[0],
                       u("8d", 104, 168), u("i", 344, 348)[0], u("i", 348, 352)[0], u("3d", 248, 272),
                       u("3d", 272, 296), (u("4d", 400, 432), u("4d", 432, 464), u("4d", 464, 496)))


def _open_nifti(path: Path):
    return (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb")


def read_nifti_header(path: str | Path) -> NiftiHeader:
    """``parse_nifti_header`` of a ``.nii`` / ``.nii.gz`` file (reads 540 bytes)."""
    path = Path(path)
    with _open_nifti(path) as f:
        return parse_nifti_header(f.read(540), path)


def nifti_nonfinite_count(path: str | Path) -> int:
    """Number of NaN/Inf voxels stored in a NIfTI-1/-2 file (0 for integer data), read from the raw bytes in
    chunks (memory bounded; never more than the header's voxel count is read).

    SimpleITK replaces NaN with 0 on read, so a float NIfTI has to be checked like this.
    Raises ValueError when the file is not NIfTI.
    """
    path = Path(path)
    with _open_nifti(path) as f:
        h = parse_nifti_header(f.read(540), path)
        if h.datatype not in _NIFTI_FLOATS:
            return 0
        dtype = np.dtype(h.endian + _NIFTI_FLOATS[h.datatype])
        f.seek(h.vox_offset)
        left, bad = h.data_bytes, 0
        chunk = _CHUNK_BYTES - _CHUNK_BYTES % dtype.itemsize
        while left > 0 and (data := f.read(min(chunk, left))):
            values = np.frombuffer(data[: len(data) - len(data) % dtype.itemsize], dtype=dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            left -= len(data)
    return bad


def _nifti_header(head: bytes, path: Path) -> tuple[str, int, int, int]:
    """(endian, datatype code, expected data bytes, vox_offset) of ``parse_nifti_header``."""
    h = parse_nifti_header(head, path)
    return h.endian, h.datatype, h.data_bytes, h.vox_offset


def _gzip_isize(path: Path) -> int | None:
    """The gzip trailer's ISIZE (uncompressed size mod 2**32 of the last member), None for a tiny file."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 18:
            return None
        f.seek(-4, 2)
        return struct.unpack("<I", f.read(4))[0]


def nifti_data_bytes(path: str | Path, slack_bytes: int = NIFTI_SLACK_BYTES) -> tuple[int, int]:
    """(bytes the NIfTI-1/-2 header promises after its vox_offset, bytes actually stored there).

    SimpleITK reads a truncated ``.nii`` or ``.nii.gz`` without complaint (the missing voxels come back as
    0), so compare the two. ``.nii``: the file size. ``.nii.gz``: when the gzip trailer's ISIZE equals
    (vox_offset + expected) mod 2**32 the stream is whole (a cut stream ends in compressed bytes that match
    by chance with probability 2**-32), without decompressing; otherwise the stream is decompressed in 4 MiB
    chunks to count what it yields, and counting stops ``slack_bytes`` past the promised size: a gzip bomb
    (gigabytes of zeros behind a small header) costs the time of the promised bytes and 4 MiB of memory; its
    stored count is then reported as more than expected. Raises ValueError when the file is not NIfTI.
    """
    path = Path(path)
    gz = path.name.lower().endswith(".gz")
    with _open_nifti(path) as f:
        _, _, expected, offset = _nifti_header(f.read(540), path)
        if not gz:
            return expected, max(path.stat().st_size - offset, 0)
        if _gzip_isize(path) == (offset + expected) % 2 ** 32:
            return expected, expected
        f.seek(0)
        stored, stop = 0, offset + expected + slack_bytes
        try:
            while stored <= stop and (chunk := f.read(_CHUNK_BYTES)):
                stored += len(chunk)
        except (EOFError, OSError, zlib.error):  # a cut or corrupt gzip stream (BadGzipFile is an OSError)
            pass
    return expected, max(stored - offset, 0)


def _quaternion_matrix(b: float, c: float, d: float) -> np.ndarray:
    """(3, 3) rotation of the NIfTI quaternion (b, c, d), a = sqrt(1 - b^2 - c^2 - d^2) (nibabel's rule)."""
    a = float(np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d))))
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])


def nifti_affines(h: NiftiHeader) -> dict[str, np.ndarray]:
    """The (4, 4) RAS voxel-to-mm affines a NIfTI header defines: ``qform`` (when qform_code > 0), ``sform``
    (when sform_code > 0) and ``pixdim`` (NIfTI method 1: diag(pixdim), origin 0), each as stored."""
    out = {"pixdim": np.diag([*(float(v) for v in h.pixdim[1:4]), 1.0])}
    if h.qform_code > 0:
        qfac = -1.0 if h.pixdim[0] < 0 else 1.0
        q = np.eye(4)
        q[:3, :3] = _quaternion_matrix(*h.quatern_bcd) @ np.diag([h.pixdim[1], h.pixdim[2], qfac * h.pixdim[3]])
        q[:3, 3] = h.qoffset_xyz
        out["qform"] = q
    if h.sform_code > 0:
        out["sform"] = np.vstack([np.asarray(h.srow, dtype=np.float64), [0.0, 0.0, 0.0, 1.0]])
    return out


def nifti_best_affine(h: NiftiHeader) -> tuple[str, np.ndarray]:
    """(source, affine) by the NIfTI rules, as nibabel applies them: the sform when sform_code > 0, else the
    qform when qform_code > 0, else pixdim."""
    affines = nifti_affines(h)
    name = "sform" if "sform" in affines else "qform" if "qform" in affines else "pixdim"
    return name, affines[name]


def itk_affine_ras(header: dict) -> np.ndarray:
    """(4, 4) RAS affine of the geometry ITK read (``read_header``: LPS origin, direction, spacing)."""
    lps = np.eye(4)
    direction = np.asarray(header["direction"], dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction @ np.diag(header["spacing_xyz_mm"][:3])
    lps[:3, 3] = header["origin_xyz_mm"][:3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
