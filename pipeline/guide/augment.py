"""Intensity augmentation of guide crops: what differs between scanners, phases and phantoms vs real CT.

All functions take a crop already windowed to [0, 1] (``GUIDE_WINDOW_HU``, 1300 HU wide) and return float32 in
[0, 1]; every random draw comes from ``rng`` (the noise through a torch generator seeded from it), so a crop is a
function of the rng state. ``augment_crop`` applies, in order: whole-scan HU shift (calibration), contrast-phase
boost of soft tissue and vessels, Gaussian blur (kernel / slice thickness), gamma, contrast and Gaussian noise.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pipeline.guide.model import GUIDE_WINDOW_HU

_WINDOW_WIDTH_HU = GUIDE_WINDOW_HU[1] - GUIDE_WINDOW_HU[0]


def hu_to_unit(hu: float) -> float:
    """A HU *difference* in window units ([0, 1] spans ``GUIDE_WINDOW_HU``)."""
    return float(hu) / _WINDOW_WIDTH_HU


def soft_tissue_weight(image01: np.ndarray, low_hu: float = -100.0, high_hu: float = 300.0) -> np.ndarray:
    """(same shape) float32 in [0, 1]: a smooth bump (sin^2) over ``low_hu .. high_hu``, 0 outside: the voxels
    whose values contrast agent changes (enhancing organs, vessels; not fat, lung, air or dense bone)."""
    lo = (low_hu - GUIDE_WINDOW_HU[0]) / _WINDOW_WIDTH_HU
    hi = (high_hu - GUIDE_WINDOW_HU[0]) / _WINDOW_WIDTH_HU
    t = np.clip((np.asarray(image01, np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return (np.sin(np.pi * t) ** 2).astype(np.float32)


def gaussian_noise(shape, std: float, rng: np.random.Generator) -> np.ndarray:
    """float32 N(0, std^2) noise of ``shape`` from torch's vectorized sampler, seeded from ``rng``."""
    seed = int(rng.integers(2 ** 63))
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()
    noise *= np.float32(std)
    return noise


def augment_crop(image01: np.ndarray, rng: np.random.Generator, gamma_range=(0.7, 1.5),
                 contrast_range=(0.75, 1.25), noise_std_max: float = 0.05, blur_sigma_max_vox: float = 0.0,
                 shift_hu: float = 0.0, soft_tissue_boost_hu: float = 0.0) -> np.ndarray:
    """One crop's intensity augmentation (see the module docstring); parameters as ``GuideAugmentConfig``.

    image01: (D, H, W) float in [0, 1]. Returns float32 (D, H, W) in [0, 1]. With the defaults (no shift, boost
    or blur) it draws exactly what the original recipe drew: gamma, contrast, noise std, noise seed.
    """
    out = np.asarray(image01, dtype=np.float32).copy()
    if shift_hu > 0:
        out += np.float32(hu_to_unit(rng.uniform(-shift_hu, shift_hu)))
    if soft_tissue_boost_hu > 0:
        out += soft_tissue_weight(out) * np.float32(hu_to_unit(rng.uniform(0.0, soft_tissue_boost_hu)))
    if blur_sigma_max_vox > 0:
        sigma = rng.uniform(0.0, blur_sigma_max_vox, out.ndim)
        if sigma.max() > 0.1:
            out = ndimage.gaussian_filter(out, sigma, mode="nearest", truncate=3.0)
    np.clip(out, 0.0, 1.0, out=out)
    gamma, contrast = rng.uniform(*gamma_range), rng.uniform(*contrast_range)
    std = rng.uniform(0.0, noise_std_max)
    out = np.power(out, np.float32(gamma))
    mean = np.float32(out.mean(dtype=np.float64))
    out -= mean
    out *= np.float32(contrast)
    out += mean
    out += gaussian_noise(out.shape, std, rng)
    return np.clip(out, 0.0, 1.0, out=out)
