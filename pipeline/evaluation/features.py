"""Features of a pretrained backbone for the downstream protocols, and the voxel feature bank of frozen heads.

``BackboneFeatures`` runs the backbone on packed inputs (image, guide coordinates, noise) and returns its
multi-scale decoder activations (DDPM-seg, Baranchuk et al. 2022: the input is noised to small timesteps t
with a fixed noise draw; several timesteps are concatenated per scale).

A frozen backbone does not change while a head trains, so its features are computed once: ``build_bank``
runs it on windows of the training volumes (organ-centred, class-balanced, as the training patches) and keeps
the features of sampled voxels, trilinearly upsampled exactly as the heads upsample them. The heads then
train on these vectors (``FeatureBank``) in a fraction of a second per step instead of a backbone forward.
"""

from __future__ import annotations

import errno
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import PretrainConfig
from pipeline.data.inputs import scale_hu
from pipeline.data.patches import PatchStream, VolumeRef, patch_coords
from pipeline.diffusion.readout import backbone_features, read_timesteps
from pipeline.diffusion.schedules import DiffusionSchedule
from pipeline.io.atomic import write_atomic
from pipeline.labels import NUM_ORGANS


class BackboneFeatures(nn.Module):
    """Multi-scale features of a backbone for inputs packed as channels (image, coords, noise).

    forward(packed (B, 1 + 3 + 1, D, H, W)) -> list of (B, C_i * n_timesteps, D/s_i, H/s_i, W/s_i), coarsest
    first. Packing the noise with the image makes sliding windows see the same noise as the whole volume.
    ``trainable``: gradients flow into the backbone (finetune); else it is frozen and runs without autograd.
    The backbone stays in eval mode either way (GroupNorm, no dropout: train and eval compute the same).
    """

    def __init__(self, backbone: nn.Module, pretrain_cfg: PretrainConfig, timesteps: tuple[int, ...],
                 trainable: bool = False):
        super().__init__()
        self.trainable = trainable
        self.backbone = backbone.eval().requires_grad_(trainable)
        self.cfg = pretrain_cfg
        self.timesteps = read_timesteps(pretrain_cfg.objective, timesteps)
        self.schedule = DiffusionSchedule.from_config(pretrain_cfg.diffusion)
        self.feature_channels = tuple(c * len(self.timesteps) for c in backbone.feature_channels)
        self.feature_strides = tuple(backbone.feature_strides)

    def train(self, mode: bool = True) -> "BackboneFeatures":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, packed: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            image, coords, noise = packed[:, :1], packed[:, 1:4], packed[:, 4:5]
            return backbone_features(self.backbone, self.cfg.model, self.schedule, image, coords, noise,
                                     self.timesteps, self.cfg.objective)


def pack_batch(batch: dict[str, np.ndarray], generator: torch.Generator) -> torch.Tensor:
    """(B, 5, D, H, W): image [0, 1], guide coordinates (3), standard normal noise."""
    image = torch.from_numpy(batch["image"])
    coords = torch.from_numpy(batch["coords"])
    noise = torch.randn(image.shape, generator=generator)
    return torch.cat([image, coords, noise], dim=1)


def pack_volume(ref: VolumeRef, window_hu, seed: int) -> torch.Tensor:
    """The whole volume packed like ``pack_batch``: (1, 5, D, H, W)."""
    shape = ref.shape_zyx
    image = torch.from_numpy(scale_hu(np.asarray(ref.image()), window_hu))[None, None]
    coords = torch.from_numpy(patch_coords(ref, (0, 0, 0), shape))[None]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    return torch.cat([image, coords, noise], dim=1)


def gather_upsampled(features: list[torch.Tensor], size_zyx, points_zyx: torch.Tensor) -> torch.Tensor:
    """Each feature map trilinearly upsampled to ``size_zyx`` (as ``F.interpolate(..., mode="trilinear",
    align_corners=False)``), read at ``points_zyx`` only, channels of all maps concatenated.

    features: list of (1, C_i, d_i, h_i, w_i); size_zyx: the full-resolution (D, H, W); points_zyx: (N, 3)
    integer voxel indices in [0, D) x [0, H) x [0, W). Returns (N, sum C_i) float32. Costs O(N), not O(D H W).
    """
    size = torch.tensor(size_zyx, dtype=torch.float32, device=points_zyx.device)
    # normalized coordinates of voxel centres in grid_sample's (x, y, z) order
    norm = (2 * (points_zyx.float() + 0.5) / size - 1).flip(-1)
    grid = norm.view(1, -1, 1, 1, 3)
    out = []
    for f in features:
        sampled = F.grid_sample(f.float(), grid.to(f.device), mode="bilinear", padding_mode="border",
                                align_corners=False)
        out.append(sampled.view(f.shape[1], -1).T)
    return torch.cat(out, dim=1)


@dataclass
class FeatureBank:
    """Frozen features of sampled training voxels: ``features`` (N, C) float16 (scales concatenated in the
    order of ``BackboneFeatures.feature_channels``), ``labels`` (N,) int64 (0 background, 1..13)."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` random rows (with replacement): (size, C) float32, (size,) int64."""
        idx = torch.randint(len(self), (size,), generator=generator)
        return self.features[idx].float(), self.labels[idx]

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and standard deviation (C,) float32, for the heads' input normalization; computed in
        chunks of rows (float64 sums) so that no float32 copy of the whole bank is made."""
        n, c = self.features.shape
        total, squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        for start in range(0, n, 65536):
            x = self.features[start:start + 65536].double()
            total += x.sum(0)
            squares += (x * x).sum(0)
        mean = total / max(n, 1)
        var = (squares - n * mean * mean) / max(n - 1, 1)
        return mean.float(), var.clamp_min(0).sqrt().float()


def sample_window_voxels(label_zyx: np.ndarray, mask_zyx: np.ndarray, n_uniform: int, n_per_organ: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Flat indices of voxels of one window: ``n_uniform`` drawn uniformly among the body voxels, plus up to
    ``n_per_organ`` of each organ present (without replacement): the true class mixture, plus every organ
    seen often enough to be learned. (D, H, W) arrays in, (N,) int64 out."""
    body = np.flatnonzero(mask_zyx)
    picks = [rng.choice(body, size=min(n_uniform, len(body)), replace=False)] if len(body) else []
    flat_label = label_zyx.reshape(-1)
    for organ in np.unique(flat_label[flat_label > 0]):
        idx = np.flatnonzero(flat_label == organ)
        picks.append(rng.choice(idx, size=min(n_per_organ, len(idx)), replace=False))
    return np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)


@dataclass(frozen=True)
class BankSpec:
    """How a volume's bank rows are drawn (part of the cache key)."""

    patch_size_zyx: tuple[int, int, int]
    window_hu: tuple[float, float]
    windows_per_volume: int
    voxels_uniform: int
    voxels_per_organ: int
    foreground_prob: float
    jitter: float
    seed: int


def _volume_seed(ref: VolumeRef, seed: int) -> list[int]:
    """(seed, a number from the volume's content): the same windows whatever id the volume got this time."""
    return [seed, int(ref.content_digest()[:8], 16)]


@torch.no_grad()
def volume_bank(features: BackboneFeatures, ref: VolumeRef, spec: BankSpec, batch_size: int = 2) -> FeatureBank:
    """The bank rows of one volume: ``spec.windows_per_volume`` windows (centred on an organ drawn uniformly among
    those present with probability ``foreground_prob``, moved by up to ``jitter`` x the window size, else on a
    body voxel), features of ``sample_window_voxels`` voxels in each. Deterministic in (``seed``, the volume's
    content), so a volume's rows are the same whichever fold it trains in and whatever id preprocessing gave it."""
    device = next(features.backbone.parameters()).device
    vseed = _volume_seed(ref, spec.seed)
    stream = PatchStream([ref], spec.patch_size_zyx, spec.window_hu, seed=vseed[0], rank=vseed[1],
                         foreground_prob=spec.foreground_prob, jitter=spec.jitter)
    rng = np.random.default_rng(vseed + [17])
    generator = torch.Generator().manual_seed(vseed[1])
    rows, labels = [], []
    for step in range((spec.windows_per_volume + batch_size - 1) // batch_size):
        n = min(batch_size, spec.windows_per_volume - step * batch_size)
        batch = stream.batch(step, n)
        feats = features(pack_batch(batch, generator).to(device))
        for b in range(n):
            label, mask = batch["label"][b], batch["mask"][b]
            flat = sample_window_voxels(label, mask, spec.voxels_uniform, spec.voxels_per_organ, rng)
            if not len(flat):
                continue
            points = torch.from_numpy(np.stack(np.unravel_index(flat, label.shape), axis=1)).to(device)
            rows.append(gather_upsampled([f[b:b + 1] for f in feats], label.shape, points).half().cpu())
            labels.append(torch.from_numpy(label.reshape(-1)[flat].astype(np.int64)))
    if not rows:
        return FeatureBank(torch.zeros(0, sum(features.feature_channels), dtype=torch.float16),
                           torch.zeros(0, dtype=torch.long))
    return FeatureBank(torch.cat(rows), torch.cat(labels))


def bank_cache_bytes(n_volumes: int, spec: BankSpec, feature_channels: int, organs: int = NUM_ORGANS) -> int:
    """At most how many bytes ``build_bank`` caches for ``n_volumes`` volumes: every window holding ``organs``
    organs (``sample_window_voxels`` rows), an fp16 feature vector and an int64 label per row, as written, plus
    1 KiB of file overhead per volume. ``feature_channels``: ``sum(BackboneFeatures.feature_channels)``."""
    rows = spec.windows_per_volume * (spec.voxels_uniform + organs * spec.voxels_per_organ)
    return n_volumes * (rows * (2 * feature_channels + 8) + 1024)


def backbone_fingerprint(features: BackboneFeatures) -> str:
    """sha256 (16 hex) of the backbone's weights and the feature settings: the bank cache key's model part."""
    digest = hashlib.sha256(repr((features.timesteps, features.cfg.model.model_dump(mode="json"),
                                  features.cfg.diffusion.model_dump(mode="json"))).encode())
    for name, tensor in sorted(features.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_bank(features: BackboneFeatures, refs: list[VolumeRef], spec: BankSpec,
               cache_dir: str | Path | None = None) -> FeatureBank:
    """The feature bank of ``refs``: ``volume_bank`` of each, concatenated. With ``cache_dir``, each volume's rows
    are kept in ``cache_dir/<backbone+spec key>/<item_id>.npz`` and reused (another fold, protocol or label
    budget on the same frozen backbone); writes are atomic. A full disk turns the cache off for the rest of the
    call (a RuntimeWarning) instead of ending the job."""
    key = None
    if cache_dir is not None:
        key = hashlib.sha256((backbone_fingerprint(features) + repr(spec)).encode()).hexdigest()[:16]
        Path(cache_dir, key).mkdir(parents=True, exist_ok=True)
    parts = []
    for ref in refs:
        path = Path(cache_dir, key, f"{ref.item_id}.npz") if key else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                parts.append(FeatureBank(torch.from_numpy(z["features"]), torch.from_numpy(z["labels"])))
            continue
        bank = volume_bank(features, ref, spec)
        if path is not None:
            try:
                write_atomic(path, lambda tmp: np.savez(tmp, features=bank.features.numpy(),
                                                        labels=bank.labels.numpy()))
            except OSError as e:   # the cache only saves time: a full disk must not end a long job here
                if e.errno != errno.ENOSPC:
                    raise
                warnings.warn("feature-bank cache not written (no space left on device): banks are recomputed "
                              "instead; free disk space (~0.1 GB per volume and backbone in the CPU study) or "
                              "set bank_cache=null",
                              RuntimeWarning, stacklevel=2)
                key = None
        parts.append(bank)
    bank = FeatureBank(torch.cat([b.features for b in parts]), torch.cat([b.labels for b in parts]))
    if not len(bank):
        raise ValueError("the feature bank is empty: no window of the training volumes touched the body")
    return bank
