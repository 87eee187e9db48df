"""Patch augmentation for the supervised ceiling and fine-tuning: exact identity, label follows image, context
large enough that zoom-out and rotation never read padding, settings checked."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import AugmentConfig, EvaluateConfig
from pipeline.data.augment import augment_batch, context_size

SIZE = (16, 20, 20)


def _batch(shape, seed=0):
    """Two patches of a smooth random image; label = image above its median, coords = the image x 3 channels."""
    rng = np.random.default_rng(seed)
    raw = rng.random((2, 1, *(-(-s // 4) for s in shape)))
    image = np.kron(raw, np.ones((1, 1, 4, 4, 4)))[:, :, :shape[0], :shape[1], :shape[2]].astype(np.float32)
    from scipy import ndimage
    image = ndimage.gaussian_filter(image, (0, 0, 1.5, 1.5, 1.5)).astype(np.float32)
    label = (image[:, 0] > np.median(image)).astype(np.int64) * 5
    return {"image": image, "coords": np.repeat(image, 3, axis=1), "mask": np.ones((2, *shape), bool),
            "label": label, "start": np.zeros((2, 3), np.int64)}


def _centre(shape):
    return tuple(slice((c - s) // 2, (c - s) // 2 + s) for c, s in zip(shape, SIZE))


def test_context_size_grows_by_even_steps_and_covers_the_largest_rotation():
    cfg = AugmentConfig(scale=(0.9, 1.2), rotate_deg=20)
    big = context_size(SIZE, cfg)
    assert all((b - s) % 2 == 0 and b >= s for b, s in zip(big, SIZE))
    assert big[0] >= 1.2 * SIZE[0] and big[1] >= 1.2 * SIZE[1] * (np.cos(np.radians(20)) + np.sin(np.radians(20)))
    assert context_size(SIZE, AugmentConfig(scale=(0.8, 1.0), rotate_deg=0)) == SIZE


def test_without_transforms_a_patch_is_the_exact_central_crop():
    cfg = AugmentConfig(p_spatial=0, p_intensity=0)
    big = context_size(SIZE, AugmentConfig())
    batch = _batch(big)
    out = augment_batch(batch, SIZE, cfg, np.random.default_rng(0))
    crop = _centre(big)
    assert out["image"].shape == (2, 1, *SIZE) and out["coords"].shape == (2, 3, *SIZE)
    np.testing.assert_allclose(out["image"], batch["image"][(slice(None), slice(None), *crop)], atol=1e-5)
    np.testing.assert_array_equal(out["label"], batch["label"][(slice(None), *crop)])
    assert out["mask"].all() and out["start"] is batch["start"]


def test_zoom_and_rotation_move_label_mask_and_coords_with_the_image():
    cfg = AugmentConfig(p_spatial=1, scale=(1.15, 1.15), rotate_deg=15, p_intensity=0)
    big = context_size(SIZE, cfg)
    batch = _batch(big, seed=3)
    out = augment_batch(batch, SIZE, cfg, np.random.default_rng(1))
    crop = _centre(big)
    assert not np.array_equal(out["label"], batch["label"][(slice(None), *crop)])     # it did move
    assert out["mask"].all()                                  # the largest zoom-out and turn read no padding
    inside = out["image"][:, 0] > np.median(batch["image"])
    agree = ((out["label"] > 0) == inside).mean()             # nearest label vs trilinear image: edges differ
    unmoved = ((batch["label"][(slice(None), *crop)] > 0) == inside).mean()
    assert agree > 0.92 and agree > unmoved + 0.1             # the label still outlines the image
    np.testing.assert_allclose(out["coords"][:, 1], out["image"][:, 0], atol=1e-5)    # coords follow too
    assert set(np.unique(out["label"])) <= {0, 5} and out["label"].dtype == np.int64


def test_intensity_changes_the_image_only_within_its_ranges():
    cfg = AugmentConfig(p_spatial=0, p_intensity=1, contrast=(1.1, 1.1), shift=0.0, noise_std=0.0)
    big = context_size(SIZE, cfg)
    batch = _batch(big)
    out = augment_batch(batch, SIZE, cfg, np.random.default_rng(0))
    crop = batch["image"][(slice(None), slice(None), *_centre(big))]
    for i in range(2):
        np.testing.assert_allclose(out["image"][i].std(), 1.1 * crop[i].std(), rtol=1e-3)
    np.testing.assert_array_equal(out["label"], batch["label"][(slice(None), *_centre(big))])
    noisy = augment_batch(batch, SIZE, AugmentConfig(p_spatial=0, p_intensity=1, noise_std=0.2),
                          np.random.default_rng(0))
    assert 0.0 <= noisy["image"].min() and noisy["image"].max() <= 1.0


def test_augment_settings_name_the_bad_field():
    with pytest.raises(ValidationError, match="scale must be"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValidationError, match="rotate_deg"):
        AugmentConfig(rotate_deg=90)
    with pytest.raises(ValidationError, match="extra"):
        AugmentConfig(flip=True)
    assert EvaluateConfig(data="x").ceiling is None and EvaluateConfig(data="x").finetune.augment is None
    assert EvaluateConfig(data="x", ceiling={"augment": {}}).ceiling.augment == AugmentConfig()
