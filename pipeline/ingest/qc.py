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


def check_complete(expected_bytes: int, stored_bytes: int) -> None:
    """A file holding fewer pixel bytes than its header promises is truncated (an interrupted copy or
    download). Raises Rejected."""
    if stored_bytes < expected_bytes:
        raise Rejected(f"truncated: {stored_bytes} of {expected_bytes} pixel bytes present")


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
