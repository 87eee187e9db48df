"""Segmentation heads on multi-scale frozen features, and their BCE + soft-Dice loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.heads import LinearHead, NonlinearHead, build_head
from pipeline.evaluation.losses import bce_dice_loss, masked_bce_with_logits, one_hot_organs, predict_labels
from pipeline.evaluation.metrics import dice_per_organ

CHANNELS = (64, 32, 16)
STRIDES = (4, 2, 1)


def _features(batch=2, size_zyx=(8, 16, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *(n // s for n in size_zyx), generator=g) for c, s in zip(CHANNELS, STRIDES)]


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_heads_output_full_resolution_logits(kind):
    torch.manual_seed(0)
    head = build_head(kind, CHANNELS, hidden=8)
    out = head(_features())
    assert out.shape == (2, 13, 8, 16, 12) and out.dtype == torch.float32
    assert head(_features(), out_size_zyx=(16, 32, 24)).shape == (2, 13, 16, 32, 24)
    # strides: the finest map (stride 2 here) is upsampled by its stride
    strided = build_head(kind, CHANNELS[:2], feature_strides=STRIDES[:2])
    assert strided(_features()[:2]).shape == (2, 13, 8, 16, 12)


def test_linear_head_is_affine_in_the_features():
    torch.manual_seed(0)
    head = LinearHead(CHANNELS)
    f, g = _features(seed=1), _features(seed=2)
    zero = head([torch.zeros_like(x) for x in f])
    lhs = head([a + 2 * b for a, b in zip(f, g)]) - zero
    rhs = (head(f) - zero) + 2 * (head(g) - zero)
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-4)


def test_nonlinear_head_acts_per_voxel_so_windows_stitch_exactly():
    torch.manual_seed(0)
    head = NonlinearHead((16,), hidden=8)
    x = torch.randn(1, 16, 6, 6, 6)
    y = x.clone()
    y[0, :, 2, 3, 4] += 5.0
    changed = (head([y]) - head([x])).abs().amax(dim=1)[0] > 0
    assert changed[2, 3, 4] and changed.sum() == 1
    # independent of the batch: a sample's output does not change with its batch mates
    torch.testing.assert_close(head([torch.cat([x, y])])[:1], head([x]))


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_head_learns_a_toy_segmentation(kind):
    """Frozen features that encode two organs; the head trained with bce_dice_loss reaches Dice > 0.95."""
    torch.manual_seed(0)
    label = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    label[0, 2:9, 3:12, 4:10] = 6
    label[0, 10:14, 2:7, 9:15] = 1
    fine = torch.randn(1, 16, 16, 16, 16) * 0.3
    fine[:, 0] += (label == 6).float()
    fine[:, 1] += (label == 1).float()
    features = [torch.randn(1, 64, 4, 4, 4), torch.randn(1, 32, 8, 8, 8), fine]
    head = build_head(kind, CHANNELS, hidden=16)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        loss = bce_dice_loss(head(features), label)
        loss.backward()
        opt.step()
    pred = predict_labels(torch.sigmoid(head(features)).detach())[0].numpy()
    dice = dice_per_organ(pred, label[0].numpy())
    assert dice[5] > 0.95 and dice[0] > 0.95
    assert np.all(np.isnan(np.delete(dice, [0, 5])))  # no false positives of absent organs


def test_head_errors():
    head = LinearHead(CHANNELS)
    with pytest.raises(ValueError, match="expects 3 feature maps"):
        head(_features()[:2])
    with pytest.raises(ValueError, match=r"does not match \(B, 64"):
        head(_features()[::-1])
    with pytest.raises(ValueError, match="head kind must be one of"):
        build_head("mlp", CHANNELS)
    with pytest.raises(ValueError, match="feature_strides"):
        LinearHead(CHANNELS, feature_strides=(4, 2))


def test_bce_dice_loss_golden_value_at_zero_logits():
    """p = 0.5 everywhere on a 2x2x2 volume with 2 spleen voxels: BCE = ln 2; Dice per class by hand."""
    label = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    label[0, 0, 0, :] = 1
    logits = torch.zeros(1, 13, 2, 2, 2)
    dice_spleen = (2 * 1.0 + 1) / (4 + 2 + 1)   # intersection 0.5*2, sum p = 4, sum t = 2, smooth 1
    dice_absent = (0 + 1) / (4 + 0 + 1)
    expected = math.log(2) + 1 - (dice_spleen + 12 * dice_absent) / 13
    assert bce_dice_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)


def test_bce_dice_loss_prefers_the_right_answer():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 6
    label[0, 2:, :2] = 2
    right = 8 * (2 * one_hot_organs(label, 13) - 1)
    swapped = torch.where(label == 6, 2, torch.where(label == 2, 6, label))   # liver <-> kidney_right
    wrong = 8 * (2 * one_hot_organs(swapped, 13) - 1)
    half_wrong = 8 * (2 * one_hot_organs(torch.roll(label, 1, dims=1), 13) - 1)
    losses = [bce_dice_loss(x, label).item() for x in (right, half_wrong, wrong)]
    assert losses[0] < 0.05 and losses[0] < losses[1] < losses[2] and losses[2] > 1.0


def test_body_mask_excludes_voxels_from_bce():
    torch.manual_seed(0)
    label = torch.randint(0, 14, (2, 4, 4, 4))
    mask = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3, 1:3] = True
    logits = torch.randn(2, 13, 4, 4, 4, requires_grad=True)
    target = one_hot_organs(label, 13)
    bce = masked_bce_with_logits(logits, target, mask)
    bce.backward()
    assert torch.all(logits.grad.abs().sum(dim=1)[~mask] == 0) and logits.grad.abs().sum() > 0
    changed = logits.detach() + 10.0 * (~mask).unsqueeze(1)
    assert masked_bce_with_logits(changed, target, mask).item() == pytest.approx(bce.item(), rel=1e-6)
    assert masked_bce_with_logits(changed, target).item() != pytest.approx(bce.item(), rel=1e-3)
    # bce_dice_loss passes the mask through: the loss only changes by the (unmasked) Dice term
    assert torch.isfinite(bce_dice_loss(logits, label, mask))
    with pytest.raises(ValueError, match="body_mask shape"):
        bce_dice_loss(logits, label, mask[:1])
    with pytest.raises(ValueError, match="do not match"):
        bce_dice_loss(logits, label[:, :2])


def test_predict_labels_threshold_and_argmax():
    probs = np.zeros((13, 1, 1, 4), np.float32)
    probs[0, 0, 0, 0] = 0.9                       # spleen
    probs[[0, 5], 0, 0, 1] = [0.6, 0.7]           # liver wins the argmax
    probs[2, 0, 0, 2] = 0.49                      # below threshold -> background
    probs[3, 0, 0, 3] = 0.5                       # exactly at threshold -> gallbladder
    labels = predict_labels(probs)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[0, 0], [1, 6, 0, 4])
    batched = predict_labels(torch.from_numpy(probs)[None], threshold=0.8)
    assert batched.dtype == torch.uint8 and batched.tolist() == [[[[1, 0, 0, 0]]]]
    with pytest.raises(ValueError, match="threshold"):
        predict_labels(probs, threshold=1.5)
