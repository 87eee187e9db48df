"""The 1-D guide: body-part regression, one score per axial slice (Yan et al. 2017; MIC-DKFZ BodyPartRegression).

Our variant, physically scaled like the 3-D guide: a small 2-D CNN maps an axial slice (its body box
resampled to S x S pixels, HU in ``GUIDE_WINDOW_HU``) to a score in [0, 1]; a learned ``axis_scale_mm`` says how
many mm one score unit is. Training draws ``m`` slices of a scan at random heights and asks that score
differences times the scale equal the slices' z distances in mm (``slice_distance_loss``: the 3-D guide's
displacement loss in one dimension; it fixes the order, inferior -> superior rising, and the scale), and that
two different in-plane crops of one slice get the same score (``slice_consistency_loss``). Yan et al. use an
order loss plus equal score steps for equal slice gaps instead; both tie scores to height, ours also to mm.

As a coordinate map (``bpr_coords``): channel z is the slice's score, channels y and x the body box's
coordinates, so a bpr guide drops into every place that reads a (3, D, H, W) guide map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.conditioning import bodybox_coords
from pipeline.data import inputs
from pipeline.data.inputs import PAD_HU, scale_hu
from pipeline.data.patches import cut_patch
from pipeline.guide.augment import augment_crop
from pipeline.guide.crops import _interpolate_axis
from pipeline.guide.model import GUIDE_WINDOW_HU
from pipeline.models.blocks import num_groups
from pipeline.models.weights import unwrap


class BodyPartRegressor(nn.Module):
    """Axial slice (N, 1, S, S) in [0, 1] -> score (N,) in [0, 1], rising from inferior to superior.

    channels: features per level; each level halves the resolution (3 x 3 conv, stride 2, GroupNorm, SiLU),
    then one more 3 x 3 conv; global average pooling and a linear layer with a sigmoid give the score.
    """

    kind = "bpr"

    def __init__(self, channels=(16, 32, 64, 64), slice_size: int = 64, init_axis_scale_mm: float = 1000.0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 8 or c % 8 for c in channels) or slice_size < 2 ** len(channels):
            raise ValueError(f"BodyPartRegressor needs channels that are multiples of 8 and slice_size >= "
                             f"2^levels; got channels={channels}, slice_size={slice_size}")
        if init_axis_scale_mm <= 0:
            raise ValueError(f"init_axis_scale_mm must be > 0 mm, got {init_axis_scale_mm}")
        self.channels, self.slice_size = channels, int(slice_size)
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(num_groups(c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(num_groups(c), c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)
        self.log_axis_scale_mm = nn.Parameter(torch.tensor([float(init_axis_scale_mm)]).log())

    @property
    def axis_scale_mm(self) -> torch.Tensor:
        """(1,) float: mm per score unit along z (always positive)."""
        return self.log_axis_scale_mm.exp()

    def config(self) -> dict:
        return {"kind": self.kind, "channels": list(self.channels), "slice_size": self.slice_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"BodyPartRegressor needs slices of shape (N, 1, S, S), got {tuple(x.shape)}")
        return torch.sigmoid(self.head(self.features(x).mean(dim=(2, 3)))[:, 0])


def build_bpr(cfg) -> BodyPartRegressor:
    """The bpr guide of a ``GuideConfig`` (model.channels, bpr_slice_size)."""
    return BodyPartRegressor(channels=cfg.model.channels, slice_size=cfg.bpr_slice_size)


def resample_slices(volume_hu_zyx: np.ndarray, slice_index: np.ndarray, box_yx, size: int) -> np.ndarray:
    """(len(slice_index), size, size) float32 HU: axial slices (integer z indices) with the in-plane box
    ``((y0, y1), (x0, x1))`` (voxel indices, may reach outside the scan: padded with air) resampled bilinearly
    to ``size`` x ``size`` pixels (the box's corners on the first and last pixel)."""
    (y0, y1), (x0, x1) = box_yx
    ys, xs = np.linspace(y0, y1, size), np.linspace(x0, x1, size)
    lo = np.array([int(np.floor(ys[0])), int(np.floor(xs[0]))])
    hi = np.array([int(np.floor(ys[-1])) + 2, int(np.floor(xs[-1])) + 2])
    out = []
    for k in np.asarray(slice_index, dtype=int):
        region = cut_patch(volume_hu_zyx, np.array([k, lo[0], lo[1]]), (1, *(hi - lo)), PAD_HU)[0]
        region = _interpolate_axis(region.astype(np.float32), 0, ys - lo[0], 1)
        out.append(_interpolate_axis(region, 1, xs - lo[1], 1))
    return np.stack(out).astype(np.float32)


def _jittered_box(box_yx, rng: np.random.Generator, keep=(0.7, 1.1),
                  min_view_fraction: float = 1.0) -> tuple[tuple[float, float], ...]:
    """A random in-plane box around the body box: each side scaled by ``keep`` and moved by up to 10 %.
    With ``min_view_fraction`` < 1, half the time per axis the box is first narrowed to a random part of the body
    (a share in [min_view_fraction, 1] at a random place): what a scan whose field of view cuts the body shows
    (the box of its body voxels, as inference finds it)."""
    out = []
    for lo, hi in box_yx:
        if min_view_fraction < 1.0 and rng.random() < 0.5:
            share, extent = rng.uniform(min_view_fraction, 1.0), hi - lo
            lo = lo + rng.uniform(0.0, 1.0 - share) * extent
            hi = lo + share * extent
        centre, half = (lo + hi) / 2, max(hi - lo, 1) / 2
        centre += rng.uniform(-0.1, 0.1) * 2 * half
        half *= rng.uniform(*keep)
        out.append((centre - half, centre + half))
    return tuple(out)


def sample_slice_set(volume_hu_zyx: np.ndarray, spacing_zyx_mm, body_bbox_zyx, n_slices: int, size: int,
                     rng: np.random.Generator, augment_params: dict | None = None,
                     min_view_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Training sample of one scan: ``n_slices`` distinct axial slices at random heights of the body box, each
    seen twice with different in-plane crops (``_jittered_box``, partial views down to ``min_view_fraction`` of
    the body per axis) and intensity augmentation.

    Returns ``image`` (2, n, 1, S, S) float32 in [0, 1] and ``z_mm`` (n,) float64 (slice height in the
    volume frame, k * spacing_z).
    """
    (z0, z1), (y0, y1), (x0, x1) = body_bbox_zyx
    n_avail = z1 - z0 + 1
    k = np.sort(rng.choice(np.arange(z0, z1 + 1), size=n_slices, replace=n_avail < n_slices))
    views = []
    for _ in range(2):
        box = _jittered_box(((y0, y1), (x0, x1)), rng, min_view_fraction=min_view_fraction)
        hu = resample_slices(volume_hu_zyx, k, box, size)
        image = scale_hu(hu, GUIDE_WINDOW_HU)
        views.append(np.stack([augment_crop(s, rng, **(augment_params or {})) for s in image])[:, None])
    return {"image": np.stack(views), "z_mm": k * float(spacing_zyx_mm[0])}


def slice_distance_loss(scores: torch.Tensor, z_mm: torch.Tensor, scale_mm: torch.Tensor) -> torch.Tensor:
    """(B, n) scores and slice heights (mm) -> scalar: mean over scans and slice pairs i != j of
    ``(scale * (t_i - t_j) - (z_i - z_j))^2`` over the scan's mean squared height difference (dimensionless)."""
    if scores.shape != z_mm.shape or scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores and z_mm must both be (B, n >= 2), got {tuple(scores.shape)}, "
                         f"{tuple(z_mm.shape)}")
    z = z_mm.to(scores.dtype)
    resid = scores * scale_mm - z
    err = (resid[:, :, None] - resid[:, None, :]) ** 2
    ref = ((z[:, :, None] - z[:, None, :]) ** 2).sum(dim=(1, 2)).clamp_min(1e-6)
    return (err.sum(dim=(1, 2)) / ref).mean()


def slice_consistency_loss(scores_a: torch.Tensor, scores_b: torch.Tensor, z_mm: torch.Tensor,
                           scale_mm: torch.Tensor) -> torch.Tensor:
    """Two views of the same slices, (B, n) each: mean of ``(scale * (a - b))^2`` over the scan's mean squared
    height difference (the distance loss's units)."""
    z = z_mm.to(scores_a.dtype)
    n = z.shape[1]
    ref = ((z[:, :, None] - z[:, None, :]) ** 2).sum(dim=(1, 2)) / max(n * (n - 1), 1)
    return ((((scores_a - scores_b) * scale_mm) ** 2).mean(dim=1) / ref.clamp_min(1e-6)).mean()


def bpr_loss(model: nn.Module, batch: dict[str, torch.Tensor], consistency_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict]:
    """``batch``: ``image`` (B, 2, n, 1, S, S), ``z_mm`` (B, n). Returns (loss, info) like ``guide_loss``."""
    image = batch["image"]
    b, _, n = image.shape[:3]
    scores = model(image.flatten(0, 2).float()).float().reshape(b, 2, n)
    scale = unwrap(model).axis_scale_mm
    z = batch["z_mm"].to(scores.device)
    dist = 0.5 * (slice_distance_loss(scores[:, 0], z, scale) + slice_distance_loss(scores[:, 1], z, scale))
    cons = slice_consistency_loss(scores[:, 0], scores[:, 1], z, scale)
    loss = dist + consistency_weight * cons
    return loss, {"loss": float(loss.detach()), "distance_loss": float(dist.detach()),
                  "consistency_loss": float(cons.detach()), "axis_scale_z_mm": float(scale.detach()[0])}


def body_bbox_from_hu(volume_hu_zyx: np.ndarray, threshold_hu: float = -500.0) -> tuple[tuple[int, int], ...]:
    """Inclusive (first, last) voxel per axis of the voxels above ``threshold_hu`` (whole volume if none)."""
    return inputs.body_bbox_zyx(np.asarray(volume_hu_zyx) > threshold_hu)


def slice_scores(model: BodyPartRegressor, volume_hu_zyx: np.ndarray, box_yx, batch: int = 64) -> np.ndarray:
    """(D,) float32 score of every axial slice (in-plane ``box_yx`` resampled to the model's slice size)."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, volume_hu_zyx.shape[0], batch):
            k = np.arange(start, min(start + batch, volume_hu_zyx.shape[0]))
            x = scale_hu(resample_slices(volume_hu_zyx, k, box_yx, model.slice_size), GUIDE_WINDOW_HU)
            out.append(model(torch.from_numpy(x[:, None]).to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def bpr_coords(model: BodyPartRegressor, volume_hu_zyx: np.ndarray, body_bbox_zyx=None) -> np.ndarray:
    """(3, D, H, W) float32 map: z = the slice's score, y and x = body-box coordinates (0 .. 1 over the box).

    body_bbox_zyx: inclusive (first, last) per axis; None: from voxels above -500 HU.
    """
    volume = np.asarray(volume_hu_zyx)
    box = body_bbox_zyx if body_bbox_zyx is not None else body_bbox_from_hu(volume)
    coords = bodybox_coords(volume.shape, box, (0, 0, 0))
    coords[0] = slice_scores(model, volume, box[1:])[:, None, None]
    return coords
