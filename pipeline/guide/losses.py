"""Self-supervised losses of the coordinate guide (APE, Goncharov et al. 2024), pure torch.

distance_loss: distances (or displacement vectors) between predicted coordinates, times the learned
mm-per-unit scale per axis, match those between the voxels' physical positions in mm, relative to the mean
physical distance of the set.
consistency_loss: the same physical voxel seen in two crops gets the same coordinates.
Both take optional leading batch dimensions; distances are only ever computed within one scan.
"""

from __future__ import annotations

import torch

#: cdist without the |a|^2 + |b|^2 - 2ab shortcut, which loses ~0.1 mm at body-sized coordinates in float32
EXACT = "donot_use_mm_for_euclid_dist"


def _check_points(name: str, points: torch.Tensor) -> None:
    if points.ndim < 2 or points.shape[-1] != 3 or points.shape[-2] < 2:
        raise ValueError(f"{name} must be (..., N, 3) with N >= 2 points, got {tuple(points.shape)}")


def mean_pairwise_distance(points: torch.Tensor) -> torch.Tensor:
    """(..., N, 3) -> (...): mean Euclidean distance over the N * (N - 1) ordered pairs i != j."""
    n = points.shape[-2]
    return torch.cdist(points, points, compute_mode=EXACT).sum(dim=(-2, -1)) / (n * (n - 1))


FRAMES = ("axes", "rigid")


def distance_loss(pred_coords: torch.Tensor, pos_mm: torch.Tensor, axis_scale_mm: torch.Tensor,
                  frame: str = "axes") -> torch.Tensor:
    """Mean squared mismatch of pairwise distances, relative to the set's mean physical distance.

    pred_coords: (..., N, 3) predicted coordinates (z, y, x), in [0, 1] for the guide.
    pos_mm: (..., N, 3) physical positions of the same voxels in mm (one scan's frame per leading index).
    axis_scale_mm: (3,) mm per coordinate unit along (z, y, x) (learnable; gradients flow to it).
    frame: "rigid" (APE): compares Euclidean distances ``|s * (p_i - p_j)|`` with ``|x_i - x_j|``; 0 when
        ``s * p`` equals ``x`` up to a rigid motion (translation, rotation, reflection), so the learned axes
        may come out rotated. "axes": compares the displacement vectors ``s * (p_i - p_j)`` with
        ``x_i - x_j``; 0 only up to a translation, so channel 0 rises from inferior to superior, channel 1
        from anterior to posterior, channel 2 from right to left (canonical LPS volumes).
    Returns a scalar: mean over leading indices of ``mean_{i != j} err_ij**2 / mean_{i != j} |x_i - x_j|**2``
    (dimensionless), err being the distance (rigid) or displacement (axes) mismatch.
    """
    _check_points("pred_coords", pred_coords)
    if pos_mm.shape != pred_coords.shape:
        raise ValueError(f"pos_mm must have the shape of pred_coords {tuple(pred_coords.shape)}, "
                         f"got {tuple(pos_mm.shape)}")
    if axis_scale_mm.shape != (3,):
        raise ValueError(f"axis_scale_mm must be (3,), got {tuple(axis_scale_mm.shape)}")
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    pos_mm = pos_mm.to(pred_coords.dtype)
    scaled = pred_coords * axis_scale_mm
    d_true = torch.cdist(pos_mm, pos_mm, compute_mode=EXACT)
    if frame == "rigid":
        sq_err = (torch.cdist(scaled, scaled, compute_mode=EXACT) - d_true) ** 2
    else:
        resid = scaled - pos_mm                                  # displacement mismatch = resid_i - resid_j
        sq_err = ((resid[..., :, None, :] - resid[..., None, :, :]) ** 2).sum(dim=-1)
    n = pred_coords.shape[-2]
    pairs = n * (n - 1)                                          # the diagonal is 0 in every matrix
    ref = (d_true.sum(dim=(-2, -1)) / pairs).clamp_min(1e-6)
    return (sq_err.sum(dim=(-2, -1)) / pairs / ref ** 2).mean()


def consistency_loss(pred_a: torch.Tensor, pred_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two coordinate sets of the same physical voxels, (..., N, 3) each.

    Returns a scalar, 0 when ``pred_a == pred_b``. The training step passes coordinates already scaled to the
    distance loss's units, so both terms weigh alike.
    """
    if pred_a.shape != pred_b.shape or pred_a.ndim < 2 or pred_a.shape[-1] != 3:
        raise ValueError(f"pred_a and pred_b must both be (..., N, 3), got {tuple(pred_a.shape)} and "
                         f"{tuple(pred_b.shape)}")
    return ((pred_a - pred_b) ** 2).mean()
