"""Quality-control rules of the preprocess stage. Each raises ``Rejected`` with a one-line reason whose prefix
(before ':') names the rule; docs/dataset-formats.md lists them all.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

MIN_SLICES = 8
#: a DICOM series with at most this many slices is a localizer/scout, not a CT volume
LOCALIZER_MAX_SLICES = 2
#: plausible voxel spacing of a CT, mm
SPACING_RANGE_MM = (0.1, 20.0)
#: a tagless image (NIfTI, NRRD, MHA) whose darkest voxel is above this is not CT (air is near -1000 HU)
CT_AIR_MAX_HU = -500.0
#: consecutive slice steps may differ from the median step by this fraction
SLICE_STEP_TOLERANCE = 0.1
_FLOAT_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64}


class Rejected(Exception):
    """An input that fails a QC rule; the message is the manifest's one-line reason."""


def check_spacing(spacing_xyz_mm) -> None:
    """Zero, negative, non-finite or implausible (outside ``SPACING_RANGE_MM``) spacing. Raises Rejected."""
    spacing = tuple(float(s) for s in spacing_xyz_mm)
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise Rejected(f"bad spacing: (x, y, z) {spacing} mm, must be > 0")
    low, high = SPACING_RANGE_MM
    if any(s < low or s > high for s in spacing):
        raise Rejected(f"implausible spacing: (x, y, z) {tuple(round(s, 4) for s in spacing)} mm, "
                       f"allowed {low}..{high} mm")


def check_header(header: dict, max_voxels: int) -> None:
    """QC from the header alone (before any pixel is read): dimension, components, spacing, voxel count,
    slices. ``header`` as returned by ``pipeline.io.readers.read_header``. Raises Rejected."""
    size = header["size_xyz"]
    if header["dimension"] == 2 or (header["dimension"] == 3 and 1 in size):
        raise Rejected(f"2-D image: size (x, y, z) {size}")
    if header["dimension"] != 3:
        raise Rejected(f"not a 3-D image: {header['dimension']}-D, size {size}")
    if header["components"] != 1:
        raise Rejected(f"not a scalar image: {header['components']} components per voxel")
    check_spacing(header["spacing_xyz_mm"])
    voxels = math.prod(size)
    if voxels > max_voxels:
        raise Rejected(f"too large: {voxels} voxels > max_voxels {max_voxels}")
    if min(size) < MIN_SLICES:
        raise Rejected(f"too few slices: {min(size)} < {MIN_SLICES} (size x, y, z {size})")


def check_complete(expected_bytes: int, stored_bytes: int, slack_bytes: int = 1 << 20) -> None:
    """A file holding fewer pixel bytes than its header promises is truncated (an interrupted copy or
    download); a compressed stream holding more than ``slack_bytes`` beyond them is oversized (a gzip bomb, or
    a header that understates the data; counting stops there). Raises Rejected."""
    if stored_bytes < expected_bytes:
        raise Rejected(f"truncated: {stored_bytes} of {expected_bytes} pixel bytes present")
    if stored_bytes > expected_bytes + slack_bytes:
        raise Rejected(f"oversized: the compressed stream holds more than {stored_bytes} bytes where the header "
                       f"promises {expected_bytes} (a gzip bomb or a wrong header; reading stopped there)")


def _corner_gap_mm(a: np.ndarray, b: np.ndarray, shape_xyz) -> float:
    """Largest distance (mm) between where the (4, 4) affines ``a`` and ``b`` put the corner voxels of a grid."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape_xyz[0] - 1) for j in (0, shape_xyz[1] - 1)
                        for k in (0, shape_xyz[2] - 1)]).T
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def check_nifti_geometry(source: str, affines: dict[str, np.ndarray], shape_xyz, itk_affine: np.ndarray) -> None:
    """The geometry sources of a NIfTI header must agree, to within half the smallest voxel at every corner of
    the image; ``source`` names the one the NIfTI rules pick (sform if sform_code > 0, else qform, else
    pixdim; ``pipeline.io.readers.nifti_best_affine``), ``affines`` holds all of them (RAS, 4 x 4) and
    ``itk_affine`` is what SimpleITK read. Rejects a degenerate chosen affine (a zero or non-finite voxel
    axis), a sheared sform, pixdim that disagrees with the sform (e.g. pixdim 0 mm where the sform says
    1.5 mm: ITK would substitute 1 mm), an sform and a qform that disagree, and an ITK reading that differs
    from the rule. With neither sform nor qform the file defines voxel sizes only (NIfTI method 1, no
    orientation): only those are compared, and the orientation is SimpleITK's (LPS identity). Raises Rejected.
    """
    chosen = affines[source]
    axes = np.linalg.norm(chosen[:3, :3], axis=0)
    if not np.all(np.isfinite(chosen)) or axes.min() <= 1e-6 or abs(np.linalg.det(chosen[:3, :3])) <= 1e-9:
        raise Rejected(f"bad geometry: the NIfTI {source} is degenerate (voxel axes {_mm(axes)} mm)")
    tol = 0.5 * float(axes.min())
    if source == "sform":
        unit = chosen[:3, :3] / axes
        shear = float(np.degrees(np.arcsin(min(1.0, np.abs(unit.T @ unit - np.eye(3)).max()))))
        if shear > 0.1:
            raise Rejected(f"bad geometry: the NIfTI sform is sheared (voxel axes {shear:.2f} degrees off "
                           "perpendicular); SimpleITK would read it as a rotation")
        pixdim = np.diag(affines["pixdim"])[:3]
        scaled = chosen.copy()
        scaled[:3, :3] = unit * np.where(np.isfinite(pixdim), pixdim, 0.0)
        if not np.all(pixdim > 0) or _corner_gap_mm(chosen, scaled, shape_xyz) > tol:
            raise Rejected(f"inconsistent geometry: pixdim says {_mm(pixdim)} mm but the sform says {_mm(axes)} mm "
                           "per voxel (x, y, z)")
        if "qform" in affines and _corner_gap_mm(chosen, affines["qform"], shape_xyz) > tol:
            gap = _corner_gap_mm(chosen, affines["qform"], shape_xyz)
            raise Rejected(f"inconsistent geometry: the NIfTI sform and qform place the image up to {gap:.1f} mm "
                           "apart")
    if source == "pixdim":  # no sform, no qform: the file defines voxel sizes only, its orientation is ITK's
        itk_axes = np.linalg.norm(itk_affine[:3, :3], axis=0)
        if np.max(np.abs(itk_axes - axes) * (np.asarray(shape_xyz[:3]) - 1)) > tol:
            raise Rejected(f"inconsistent geometry: SimpleITK reads {_mm(itk_axes)} mm per voxel where pixdim says "
                           f"{_mm(axes)} mm")
        return
    gap = _corner_gap_mm(chosen, itk_affine, shape_xyz)
    if gap > tol:
        raise Rejected(f"inconsistent geometry: SimpleITK reads the image up to {gap:.1f} mm away from where its "
                       f"NIfTI {source} puts it")


def check_pixels(image: sitk.Image, raw_nonfinite: int = 0) -> None:
    """QC of the read image: spacing, NaN/Inf voxels (``raw_nonfinite``: those counted in the file's raw
    bytes, for readers that hide them). Raises Rejected."""
    check_spacing(image.GetSpacing())
    bad = raw_nonfinite
    if image.GetPixelID() in _FLOAT_TYPES:
        bad = max(bad, int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image)))))
    if bad:
        raise Rejected(f"non-finite voxels: {bad} NaN/Inf")


def check_ct_intensity(volume_zyx: np.ndarray) -> None:
    """A tagless image is CT when its darkest voxel is at most ``CT_AIR_MAX_HU`` (air, lungs or the area
    outside the scan field sit near -1000 HU); MR, PET or CT stored without its rescale fail. Raises Rejected."""
    low = float(np.min(volume_zyx))
    if low > CT_AIR_MAX_HU:
        raise Rejected(f"not CT: darkest voxel {low:g} > {CT_AIR_MAX_HU:g} HU (no air; MR/PET, or CT "
                       "without its HU rescale)")


def check_localizer(image_types: list[str] | tuple[str, ...]) -> None:
    """A DICOM series is a localizer/scout when any ImageType (0008,0008) holds LOCALIZER or the series has at
    most ``LOCALIZER_MAX_SLICES`` slices. Raises Rejected."""
    flagged = next((t for t in image_types if "LOCALIZER" in t.upper().split("\\")), None)
    if flagged is not None:
        raise Rejected(f"localizer: ImageType {flagged}")
    if len(image_types) <= LOCALIZER_MAX_SLICES:
        raise Rejected(f"localizer: {len(image_types)}-slice DICOM series (scout)")


def check_multiframe(frames: int, sop_class: str) -> None:
    """One DICOM file holding several frames (an enhanced multi-frame CT, or a multi-frame secondary capture)
    is not read: its per-frame geometry lives in functional groups. Raises Rejected."""
    if frames > 1:
        what = "an enhanced CT" if sop_class == "1.2.840.10008.5.1.4.1.1.2.1" else f"SOP class {sop_class or '?'}"
        raise Rejected(f"multi-frame DICOM: one file holds {frames} frames ({what}); convert it to one file per "
                       "slice or to NIfTI first (e.g. dcm2niix)")


def check_slice_positions(positions_mm) -> None:
    """Slice positions (N,) along the normal in mm, sorted: duplicates, gaps (missing slices) and non-uniform
    steps. Raises Rejected; ``None`` (positions unknown) raises too, as the geometry cannot be trusted."""
    if positions_mm is None:
        raise Rejected("missing geometry: a slice lacks ImagePositionPatient or ImageOrientationPatient")
    steps = np.diff(np.asarray(positions_mm, dtype=np.float64))
    if steps.size == 0:
        return
    step = float(np.median(steps))
    if steps.min() < 1e-3:
        raise Rejected(f"duplicate slices: {int(np.sum(steps < 1e-3))} slices share a position with another "
                       "(two series without UIDs in one folder, or a repeated export)")
    k = int(np.argmax(steps))
    if steps[k] > step * 1.5:
        raise Rejected(f"missing slices: gap of {steps[k]:.2f} mm after slice {k} (slice step {step:.2f} mm, "
                       f"about {round(steps[k] / step) - 1} missing)")
    if steps.max() - steps.min() > SLICE_STEP_TOLERANCE * step:
        raise Rejected(f"non-uniform slice spacing: steps {steps.min():.2f}..{steps.max():.2f} mm")
