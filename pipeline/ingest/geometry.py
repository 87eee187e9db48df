"""Canonical orientation, resampling and cropping of SimpleITK images, all in LPS physical space (mm).

A canonical image has the identity direction: ``GetArrayFromImage`` gives (z, y, x) with index growth along
Superior, Posterior, Left (docs/conventions.md).
"""

from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

AIR_HU = -1024.0
#: direction cosines closer than this to 0 / +-1 count as axis-aligned (1e-4 rad over 500 mm = 0.05 mm)
AXIS_TOLERANCE = 1e-4


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """(3, 3) float64 direction matrix; column c is the LPS unit vector of array index axis c (x, y, z)."""
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def is_axis_aligned(image: sitk.Image, tol: float = AXIS_TOLERANCE) -> bool:
    """True when the direction matrix is a signed permutation (up to ``tol``)."""
    d = np.abs(direction_matrix(image))
    return bool(np.all(np.minimum(d, np.abs(d - 1)) < tol))


def physical_bounds_xyz_mm(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) LPS corners (3,) of the box covering all voxel edges of ``image``, in mm."""
    size = np.asarray(image.GetSize(), dtype=float)
    corners = [np.asarray(image.TransformContinuousIndexToPhysicalPoint(list(c * size - 0.5)))
               for c in itertools.product((0.0, 1.0), repeat=3)]
    return np.min(corners, axis=0), np.max(corners, axis=0)


def _aligned_grid(image: sitk.Image) -> sitk.Image:
    """An identity-direction reference grid covering ``image``; axis a gets the spacing of the image axis
    closest to it."""
    low, high = physical_bounds_xyz_mm(image)
    closest = np.argmax(np.abs(direction_matrix(image)), axis=1)
    spacing = np.asarray(image.GetSpacing())[closest]
    size = np.maximum(np.round((high - low) / spacing).astype(int), 1)
    ref = sitk.Image([int(s) for s in size], image.GetPixelID())
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(v) for v in low + spacing / 2])
    return ref


def to_canonical(image: sitk.Image, is_label: bool = False, default_value: float = AIR_HU) -> sitk.Image:
    """The same 3-D image on a grid with identity direction (LPS), so arrays are (z, y, x) = (S, P, L).

    Axis-aligned directions are permuted/flipped without interpolation (``sitk.DICOMOrient``); oblique ones
    are resampled (linear, nearest for labels) onto an axis-aligned grid covering the image, filling
    ``default_value`` (HU; 0 for labels) outside it. Raises ValueError for a non-3-D image.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"to_canonical needs a 3-D image, got {image.GetDimension()}-D")
    if is_axis_aligned(image):
        out = sitk.DICOMOrient(image, "LPS")
        residual = np.abs(direction_matrix(out) - np.eye(3)).max()
        if residual > AXIS_TOLERANCE:
            raise AssertionError(f"DICOMOrient left a direction {out.GetDirection()} (residual {residual})")
        out.SetDirection(np.eye(3).ravel().tolist())
        return out
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    fill = 0.0 if is_label else default_value
    return sitk.Resample(image, _aligned_grid(image), sitk.Transform(), interp, fill, image.GetPixelID())


def antialias_sigma_mm(spacing_zyx_mm, target_spacing_zyx_mm) -> tuple[float, ...]:
    """Gaussian sigma (mm, z y x) applied before downsampling: ``(target - source) / 2`` where the target is
    coarser, 0 elsewhere (skimage's rule ``(factor - 1) / 2`` voxels)."""
    return tuple(max(t - s, 0.0) / 2 for s, t in zip(spacing_zyx_mm, target_spacing_zyx_mm))


def _like(array_zyx: np.ndarray, image: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array_zyx)
    out.CopyInformation(image)
    return out


def resample_to_spacing(image: sitk.Image, spacing_zyx_mm, is_label: bool = False,
                        default_value: float = AIR_HU, antialias: bool = True) -> sitk.Image:
    """Resample to ``spacing_zyx_mm`` (mm) keeping the physical extent (the box of voxel edges).

    Images: linear interpolation of float32 (after Gaussian anti-aliasing along downsampled axes), output
    float32. Labels: nearest neighbour, pixel type kept. New size = round(extent / spacing), at least 1;
    the grid is centred so that its edge box matches the old one when extent is a multiple of spacing.
    """
    old_sp = np.asarray(image.GetSpacing(), dtype=float)
    new_sp = np.asarray(spacing_zyx_mm, dtype=float)[::-1]
    old_size = np.asarray(image.GetSize(), dtype=float)
    new_size = np.maximum(np.round(old_size * old_sp / new_sp).astype(int), 1)
    shift_index = (old_size * old_sp - new_size * new_sp) / 2 + (new_sp - old_sp) / 2
    origin = np.asarray(image.GetOrigin()) + direction_matrix(image) @ shift_index
    if not is_label:
        image = sitk.Cast(image, sitk.sitkFloat32)
        sigma_vox_zyx = np.asarray(antialias_sigma_mm(old_sp[::-1], new_sp[::-1])) / old_sp[::-1]
        if antialias and sigma_vox_zyx.max() > 0:
            smooth = ndimage.gaussian_filter(sitk.GetArrayViewFromImage(image), sigma_vox_zyx, mode="nearest")
            image = _like(smooth, image)
    ref = sitk.Image([int(s) for s in new_size], image.GetPixelID())
    ref.SetSpacing(new_sp.tolist())
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(image.GetDirection())
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, ref, sitk.Transform(), interp, 0.0 if is_label else default_value)


def resample_label_onto(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``label`` sampled by nearest neighbour at the PHYSICAL position of every ``reference`` voxel.

    Works whatever the two direction matrices are (a label stored with a flipped axis lands correctly).
    Output: the reference grid, the label's pixel type, 0 outside the label.
    """
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def crop_to_bbox(image: sitk.Image, bbox_zyx: tuple[slice, slice, slice]) -> sitk.Image:
    """The sub-image ``array[bbox_zyx]`` (slices in z, y, x order, step 1) with its physical origin kept."""
    z, y, x = bbox_zyx
    return image[x, y, z]
