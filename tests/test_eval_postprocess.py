"""Post-processing of label maps: each organ loses its islands below a fraction of its largest component."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import EvaluateConfig, SegmenterConfig
from pipeline.evaluation.postprocess import remove_islands


def _islands() -> np.ndarray:
    labels = np.zeros((10, 12, 12), np.uint8)
    labels[1:6, 1:6, 1:6] = 6          # liver: 125 voxels
    labels[8:10, 9:11, 9:11] = 6       # a stray liver island: 8 voxels (6 % of the largest), far away
    labels[0:4, 8:11, 7:11] = 5        # oesophagus broken in two halves: 48 ...
    labels[5:8, 8:11, 7:11] = 5        # ... and 36 voxels (75 %)
    labels[7, 1, 1] = 1                # a lone spleen speck: one component, kept
    return labels


def test_islands_below_the_fraction_go_and_comparable_pieces_stay():
    labels = _islands()
    before = labels.copy()
    out = remove_islands(labels, 0.2)
    assert np.array_equal(labels, before)                    # the input is not modified
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert (out == 6).sum() == 125 and (out[8:10, 9:11, 9:11] == 0).all()   # removed voxels become background
    assert (out == 5).sum() == 84 and out[7, 1, 1] == 1
    largest = remove_islands(labels, 1.0)                    # the largest component only
    assert (largest == 5).sum() == 48 and (largest == 6).sum() == 125 and (largest == 1).sum() == 1
    assert remove_islands(labels, 0.0) is labels             # 0: no post-processing


def test_components_are_26_connected():
    labels = np.zeros((6, 6, 6), np.int16)
    for i in range(5):                                       # a diagonal tube: corners touch only
        labels[i, i, i] = 12
    labels[0, 5, 5] = 12                                     # and one isolated voxel
    out = remove_islands(labels, 1.0)
    assert (out == 12).sum() == 5 and out[0, 5, 5] == 0
    assert not remove_islands(np.zeros((3, 3, 3), np.uint8), 0.5).any()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="min_fraction must be in"):
        remove_islands(_islands(), 1.5)
    with pytest.raises(ValueError, match="3-D integer label map"):
        remove_islands(_islands().astype(np.float32), 0.2)


def test_configs_default_to_the_chosen_fraction_and_check_its_range():
    assert EvaluateConfig(data="x").island_fraction == 0.2
    seg = SegmenterConfig(data=("x",))
    assert seg.island_fraction == 0.2 and seg.evaluate_config().island_fraction == 0.2
    assert SegmenterConfig(data=("x",), island_fraction=0).evaluate_config().island_fraction == 0
    with pytest.raises(ValueError, match="island_fraction"):
        EvaluateConfig(data="x", island_fraction=2)
