"""Canonical orientation, resampling and cropping of SimpleITK images, all in LPS physical space (mm).

A canonical image has the identity direction: ``GetArrayFromImage`` gives (z, y, x) with index growth along
Superior, Posterior, Left (docs/conventions.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
    if np.abs(direction_matrix(image) - np.eye(3)).max() <= AXIS_TOLERANCE:
        if direction_matrix(image).tolist() != np.eye(3).tolist():
            image = sitk.Image(image)  # a copy only when the tiny residual has to be zeroed
            image.SetDirection(np.eye(3).ravel().tolist())
        return image                   # already canonical: no copy of the pixels
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


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS physical space: size and spacing (x, y, z), origin (mm), direction (9 floats)."""

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def point(self, index_xyz) -> tuple[float, float, float]:
        """Physical position (mm) of a (continuous) voxel index (x, y, z)."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        p = np.asarray(self.origin_xyz) + d @ (np.asarray(index_xyz, dtype=np.float64) * self.spacing_xyz)
        return tuple(float(v) for v in p)

    def image(self, pixel_id: int = sitk.sitkUInt8, size_xyz=None, origin_xyz=None) -> sitk.Image:
        """An image with this geometry (or a sub-grid of it: ``size_xyz``, ``origin_xyz``), zero-filled."""
        out = sitk.Image([int(v) for v in (size_xyz or self.size_xyz)], pixel_id)
        out.SetSpacing([float(v) for v in self.spacing_xyz])
        out.SetOrigin([float(v) for v in (origin_xyz or self.origin_xyz)])
        out.SetDirection([float(v) for v in self.direction])
        return out


def output_grid(image: sitk.Image, spacing_zyx_mm) -> Grid:
    """The grid of ``image`` resampled to ``spacing_zyx_mm`` (mm), keeping the physical extent (the box of
    voxel edges): size = round(extent / spacing), at least 1, centred so that its edge box matches the old
    one when the extent is a multiple of the spacing; same direction."""
    old_sp = np.asarray(image.GetSpacing(), dtype=float)
    new_sp = np.asarray(spacing_zyx_mm, dtype=float)[::-1]
    old_size = np.asarray(image.GetSize(), dtype=float)
    new_size = np.maximum(np.round(old_size * old_sp / new_sp).astype(int), 1)
    shift_index = (old_size * old_sp - new_size * new_sp) / 2 + (new_sp - old_sp) / 2
    origin = np.asarray(image.GetOrigin()) + direction_matrix(image) @ shift_index
    return Grid(tuple(int(v) for v in new_size), tuple(float(v) for v in new_sp),
                tuple(float(v) for v in origin), tuple(image.GetDirection()))


def _antialias_sigma_vox_zyx(image: sitk.Image, grid: Grid) -> np.ndarray:
    old_sp = np.asarray(image.GetSpacing(), dtype=float)[::-1]
    return np.asarray(antialias_sigma_mm(old_sp, np.asarray(grid.spacing_xyz)[::-1])) / old_sp


def resample_to_spacing(image: sitk.Image, spacing_zyx_mm, is_label: bool = False,
                        default_value: float = AIR_HU, antialias: bool = True) -> sitk.Image:
    """Resample to ``spacing_zyx_mm`` (mm) keeping the physical extent (``output_grid``).

    Images: linear interpolation of float32 (after Gaussian anti-aliasing along downsampled axes), output
    float32. Labels: nearest neighbour, pixel type kept. The whole volume is converted at once: the
    preprocess stage uses ``resample_hu_int16`` (the same result in slabs, a fraction of the memory).
    """
    grid = output_grid(image, spacing_zyx_mm)
    if not is_label:
        image = sitk.Cast(image, sitk.sitkFloat32)
        sigma_vox_zyx = _antialias_sigma_vox_zyx(image, grid)
        if antialias and sigma_vox_zyx.max() > 0:
            smooth = ndimage.gaussian_filter(sitk.GetArrayViewFromImage(image), sigma_vox_zyx, mode="nearest")
            image = _like(smooth, image)
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, grid.image(image.GetPixelID()), sitk.Transform(), interp,
                         0.0 if is_label else default_value)


#: output voxels per slab of ``resample_hu_int16`` (float32 temporaries of about this size stay alive)
SLAB_VOXELS = 1 << 22
#: scipy's gaussian_filter truncation (radius = int(truncate * sigma + 0.5) voxels)
_TRUNCATE = 4.0


def axis_weights(n_in: int, positions, sigma_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """One axis of anti-aliased linear resampling as a matrix: (W (n_out, n_in) float64, outside (n_out,) bool).

    ``W @ a`` = the 1-D signal ``a`` smoothed by a Gaussian of ``sigma_vox`` voxels (scipy's kernel, truncated
    at 4 sigma, edges extended as ``mode="nearest"``), then read by linear interpolation at the continuous
    indices ``positions``; indices within half a voxel outside the ends read the end voxel; rows of
    ``outside`` (further out) are all zero.
    """
    positions = np.asarray(positions, dtype=np.float64)
    smooth = np.eye(n_in)
    if sigma_vox > 0:
        radius = int(_TRUNCATE * sigma_vox + 0.5)
        taps = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (taps / sigma_vox) ** 2)
        kernel /= kernel.sum()
        smooth = np.zeros((n_in, n_in))
        rows = np.arange(n_in)
        for t, w in zip(taps, kernel):
            smooth[rows, np.clip(rows + t, 0, n_in - 1)] += w      # one (row, col) per row: no lost updates
    outside = (positions < -0.5) | (positions > n_in - 0.5)
    p = np.clip(positions, 0, n_in - 1)
    i0 = np.minimum(np.floor(p).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = p - i0
    interp = np.zeros((len(positions), n_in))
    k = np.arange(len(positions))
    interp[k, i0] += 1 - frac
    interp[k, i1] += frac
    interp[outside] = 0.0
    return interp @ smooth, outside


#: output rows per matrix product of ``resample_hu_int16``: each product reads only its band of input rows
BAND_OUT = 16


def _banded(w: np.ndarray, read, product) -> np.ndarray | None:
    """``product(w[:, band] as float32, read(band))`` over the input band [lo, hi) that the rows of ``w``
    touch; None when they touch none (every row outside the input)."""
    used = np.flatnonzero(np.abs(w).sum(axis=0) > 0)
    if not used.size:
        return None
    lo, hi = int(used[0]), int(used[-1]) + 1
    return product(w[:, lo:hi].astype(np.float32), read(lo, hi))


def _apply_banded(w: np.ndarray, array: np.ndarray, axis: int) -> np.ndarray:
    """``w`` (n_out, n_in) applied along ``axis`` (1 or 2) of a (k, Y, X) float32 array, ``BAND_OUT`` output rows
    at a time, each product over the band of input rows its weights touch."""
    shape = list(array.shape)
    shape[axis] = w.shape[0]
    out = np.zeros(shape, dtype=np.float32)
    for r0 in range(0, w.shape[0], BAND_OUT):
        rows = slice(r0, min(r0 + BAND_OUT, w.shape[0]))
        if axis == 1:
            res = _banded(w[rows], lambda lo, hi: array[:, lo:hi, :], np.matmul)
            if res is not None:
                out[:, rows, :] = res
        else:
            res = _banded(w[rows], lambda lo, hi: array[:, :, lo:hi], lambda wb, a: np.matmul(a, wb.T))
            if res is not None:
                out[:, :, rows] = res
    return out


def resample_hu_int16(image: sitk.Image, spacing_zyx_mm, hu_range=(-1024, 3071), default_value: float = AIR_HU,
                      antialias: bool = True, slab_voxels: int = SLAB_VOXELS) -> tuple[np.ndarray, Grid]:
    """``resample_to_spacing`` of an image, rounded and clipped to ``hu_range`` as int16, fast and lean.

    The grids share the direction, so the Gaussian anti-aliasing and the trilinear interpolation are
    separable: one small matrix per axis (``axis_weights``) applied along z, y and x in turn, as matrix
    products on slabs of output slices (each reads only the input slices its weights touch). No float copy
    of the whole volume is made: peak memory is the input, the int16 output and a few slab-sized float32
    arrays. Values equal ``resample_to_spacing`` (scipy Gaussian + ITK linear interpolation) to within
    float rounding inside the volume; in the half voxel beyond the last input voxel centre the end voxel is
    read (ITK may differ there by the interpolation weight). Returns (array (Z, Y, X) int16, its grid).
    """
    grid = output_grid(image, spacing_zyx_mm)
    source = sitk.GetArrayViewFromImage(image)                           # (Z, Y, X), no copy
    d = direction_matrix(image)
    offset = d.T @ (np.asarray(grid.origin_xyz) - np.asarray(image.GetOrigin()))   # mm along each index axis
    sigma = _antialias_sigma_vox_zyx(image, grid)[::-1] if antialias else np.zeros(3)   # (x, y, z)
    weights = []
    for a in range(3):                                                    # x, y, z
        positions = (offset[a] + np.arange(grid.size_xyz[a]) * grid.spacing_xyz[a]) / image.GetSpacing()[a]
        weights.append(axis_weights(image.GetSize()[a], positions, float(sigma[a])))
    (wx, out_x), (wy, out_y), (wz, out_z) = weights
    nx, ny, nz = grid.size_xyz
    out = np.empty((nz, ny, nx), dtype=np.int16)
    per_slab = max(1, min(BAND_OUT, slab_voxels // max(nx * ny, 1)))
    edge = out_y[:, None] | out_x[None, :]                                  # (ny, nx) outside in-plane
    for k0 in range(0, nz, per_slab):
        k1 = min(k0 + per_slab, nz)
        slab = _banded(wz[k0:k1], lambda lo, hi: source[lo:hi].astype(np.float32),
                       lambda w, block: np.tensordot(w, block, axes=(1, 0)))                # (k, Y, X)
        if slab is None:
            slab = np.zeros((k1 - k0,) + source.shape[1:], dtype=np.float32)
        slab = _apply_banded(wy, slab, axis=1)                                             # (k, ny, X)
        slab = _apply_banded(wx, slab, axis=2)                                             # (k, ny, nx)
        slab[:, edge] = default_value
        slab[out_z[k0:k1]] = default_value
        np.clip(np.rint(slab, out=slab), *hu_range, out=slab)
        out[k0:k1] = slab
    return out, grid


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
