"""Landmark spread and its baselines: golden numbers on hand-built label volumes."""

import numpy as np
import pytest

from pipeline.guide.scoring import (bodybox_organ_coords, landmark_spread, monotonic_fraction,
                                    organ_centroids_zyx, organ_coords_from_map, scanner_organ_coords,
                                    slice_means)


def _label():
    label = np.zeros((10, 12, 14), np.uint8)
    label[2:4, 3:5, 4:6] = 1                  # centroid (2.5, 3.5, 4.5)
    label[6, 8, 10] = 6                       # centroid (6, 8, 10)
    return label


def test_organ_centroids_golden():
    cents = organ_centroids_zyx(_label())
    assert sorted(cents) == [1, 6]
    np.testing.assert_allclose(cents[1], [2.5, 3.5, 4.5])
    np.testing.assert_allclose(cents[6], [6, 8, 10])
    assert organ_centroids_zyx(np.zeros((3, 3, 3), np.uint8)) == {}


def test_scanner_and_bodybox_baselines_golden():
    scan = scanner_organ_coords(_label(), spacing_zyx_mm=(2.0, 1.0, 0.5), origin_zyx_mm=(100.0, -50.0, 0.0))
    np.testing.assert_allclose(scan[1], [105.0, -46.5, 2.25])
    mask = np.zeros((10, 12, 14), np.uint8)
    mask[2:7, 3:9, 4:11] = 1                  # box first (2, 3, 4), last (6, 8, 10)
    box = bodybox_organ_coords(_label(), mask)
    np.testing.assert_allclose(box[1], [0.125, 0.1, 1 / 12])
    np.testing.assert_allclose(box[6], [1.0, 1.0, 1.0])


def test_organ_coords_from_map_is_mean_over_the_organ():
    label = _label()
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in label.shape], indexing="ij"))
    got = organ_coords_from_map(coords, label)                      # identity map -> centroids
    np.testing.assert_allclose(got[1], [2.5, 3.5, 4.5])
    with pytest.raises(ValueError, match="share"):
        organ_coords_from_map(coords[:, :5], label)


def test_landmark_spread_zero_for_identical_frames():
    vol = {1: np.array([0.1, 0.2, 0.3]), 2: np.array([0.9, 0.2, 0.3]), 3: np.array([0.5, 0.8, 0.1])}
    assert landmark_spread([vol, dict(vol), dict(vol)]) == pytest.approx(0.0, abs=1e-12)


def test_landmark_spread_golden_value_and_skipping():
    vols = [
        {1: np.array([0.0, 0, 0]), 2: np.array([10.0, 0, 0]), 7: np.array([99.0, 99, 99])},   # 7 seen once
        {1: np.array([2.0, 0, 0]), 2: np.array([10.0, 0, 0])},
    ]
    # organ 1: mean (1, 0, 0), RMS 1; organ 2: RMS 0; between means: 9 -> (1 + 0) / 2 / 9
    assert landmark_spread(vols) == pytest.approx(0.5 / 9)
    scaled = [{k: 1000 * v for k, v in d.items()} for d in vols]
    assert landmark_spread(scaled) == pytest.approx(0.5 / 9)      # unit-free


def test_landmark_spread_needs_two_organs():
    with pytest.raises(ValueError, match=">= 2 organs"):
        landmark_spread([{1: np.zeros(3)}, {1: np.ones(3)}, {2: np.ones(3)}])


def test_slice_means_and_monotonic_fraction():
    z = np.broadcast_to(np.array([0.1, 0.2, 0.15, 0.4, 0.5])[:, None, None], (5, 3, 3))
    mask = np.ones((5, 3, 3), bool)
    mask[2] = False                                                 # slice without body is dropped
    np.testing.assert_allclose(slice_means(z, mask), [0.1, 0.2, 0.4, 0.5])
    assert monotonic_fraction(slice_means(z)) == pytest.approx(3 / 4)
    assert monotonic_fraction(slice_means(z, mask)) == 1.0
    assert monotonic_fraction([3, 2, 1]) == 0.0
    with pytest.raises(ValueError, match=">= 2 values"):
        monotonic_fraction([1.0])


def test_per_axis_spread_exposes_a_collapsed_axis():
    from pipeline.guide.scoring import landmark_spread_per_axis

    rng = np.random.default_rng(0)
    truth = {1: np.array([100.0, 0, 0]), 2: np.array([0.0, 50, 0]), 3: np.array([0.0, 0, 80])}
    good = [{o: c + rng.normal(0, 2, 3) for o, c in truth.items()} for _ in range(6)]
    collapsed = [{o: c * [0.01, 1, 1] + rng.normal(0, 2, 3) for o, c in truth.items()} for _ in range(6)]
    per_good, per_collapsed = landmark_spread_per_axis(good), landmark_spread_per_axis(collapsed)
    assert per_good.shape == (3,) and np.all(per_good < 0.1)
    assert per_collapsed[0] > 1.0 and np.all(per_collapsed[1:] < 0.1)   # z alone tells
    # golden: organ 1 at z 0 and 2, organ 2 at z 10 and 10 -> rms (1, 0), |mean difference| 9
    two = [{1: np.array([0.0, 0, 0]), 2: np.array([10.0, 1, 1])}, {1: np.array([2.0, 0, 0]), 2: np.array([10.0, 1, 1])}]
    assert landmark_spread_per_axis(two)[0] == pytest.approx(0.5 / 9)
