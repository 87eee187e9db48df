"""Dice with the empty-organ rule, its mean and table; report PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import dice_mean, dice_per_organ, dice_table
from pipeline.evaluation.report import dice_bar_chart, overlay_png
from pipeline.labels import ORGANS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _hand_built() -> tuple[np.ndarray, np.ndarray]:
    """Reference / prediction on a (2, 4, 4) grid with known overlaps per organ."""
    label = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros((2, 4, 4), np.uint8)
    label[0, 0, :4] = 1             # spleen: 4 reference voxels
    pred[0, 0, :2] = 1              # 2 of them predicted ...
    pred[0, 1, :2] = 1              # ... plus 2 false positives -> 2*2/(4+4) = 1/2
    label[1, 0, :3] = 2             # kidney_right: 3 reference voxels
    pred[1, 0, :4] = 2              # all found + 1 extra -> 2*3/(3+4) = 6/7
    pred[1, 3, 3] = 4               # gallbladder absent from reference but predicted -> 0
    label[1, 2, 0] = 5              # esophagus present but missed -> 0
    return pred, label              # kidney_left (3) and 6..13: in neither map -> NaN


def test_dice_golden_fractions_and_empty_organ_rule():
    pred, label = _hand_built()
    dice = dice_per_organ(pred, label)
    assert dice.shape == (13,) and dice.dtype == np.float64
    assert dice[0] == pytest.approx(0.5)
    assert dice[1] == pytest.approx(6 / 7)
    assert np.isnan(dice[2])                      # absent from both -> not counted
    assert dice[3] == 0.0                         # absent from reference, predicted -> 0
    assert dice[4] == 0.0                         # present, missed -> 0
    assert np.all(np.isnan(dice[5:]))
    assert dice_mean(dice) == pytest.approx((0.5 + 6 / 7 + 0 + 0) / 4)


def test_dice_is_symmetric_and_perfect_on_identity():
    pred, label = _hand_built()
    np.testing.assert_array_equal(dice_per_organ(label, pred), dice_per_organ(pred, label))
    same = dice_per_organ(label, label)
    assert np.all(same[~np.isnan(same)] == 1.0) and np.sum(~np.isnan(same)) == 3


def test_dice_mean_all_nan_is_nan():
    empty = np.zeros((3, 3, 3), np.int64)
    dice = dice_per_organ(empty, empty)
    assert np.all(np.isnan(dice))
    assert math.isnan(dice_mean(dice))


@pytest.mark.parametrize("pred, label, match", [
    (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), "shape"),
    (np.full((2, 2, 2), 14, np.uint8), np.zeros((2, 2, 2), np.uint8), r"pred_zyx values must be in \[0, 13\]"),
    (np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), "integer label map"),
])
def test_dice_rejects_bad_inputs(pred, label, match):
    with pytest.raises(ValueError, match=match):
        dice_per_organ(pred, label)


def test_dice_table_markdown():
    pred, label = _hand_built()
    table = dice_table({"pretrained": dice_per_organ(pred, label), "random init": np.zeros(13)})
    lines = table.strip().split("\n")
    assert lines[0] == "| organ | pretrained | random init |"
    assert len(lines) == 2 + 13 + 1
    assert lines[2] == "| spleen | 0.500 | 0.000 |"
    assert lines[3] == "| kidney_right | 0.857 | 0.000 |"
    assert lines[4] == "| kidney_left | n/a | 0.000 |"
    assert lines[-1] == "| **mean** | 0.339 | 0.000 |"
    assert [line.split(" | ")[0][2:] for line in lines[2:-1]] == list(ORGANS)
    with pytest.raises(ValueError, match="shape"):
        dice_table({"short": np.zeros(5)})


def _assert_png(path, min_pixels=200):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_pixels and image.shape[1] >= min_pixels


def test_dice_bar_chart_writes_png(tmp_path):
    rows = {"pretrained": np.linspace(0.2, 0.9, 13), "random init": np.full(13, np.nan)}
    out = dice_bar_chart(rows, tmp_path / "dice.png")
    _assert_png(out)


def test_overlay_png_writes_png_and_checks_z(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(40, 50, (6, 32, 32)).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[3, 8:20, 8:20] = 6
    pred = np.roll(label, 2, axis=2)
    _assert_png(overlay_png(image, label, pred, tmp_path / "overlay.png", spacing_zyx_mm=(2.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="z must be a slice index"):
        overlay_png(image, label, pred, tmp_path / "bad.png", z=6)
