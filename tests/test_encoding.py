"""Coordinate encodings fed to the denoiser and the body-box geometric guide."""

import math

import numpy as np
import pytest
import torch

from pipeline.data.conditioning import bodybox_coords, encode_coords, encoding_channels, sincos_encode


def _coords(shape=(2, 3, 4, 5, 6), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_sincos_channels_range_and_golden_layout():
    F = 4
    coords = _coords()
    enc = sincos_encode(coords, F)
    assert enc.shape == (2, 6 * F, 4, 5, 6) and enc.dtype == torch.float32
    assert enc.abs().max() <= 1.0
    # channel a * F + k = sin(2**k pi c_a); channel 3F + a * F + k = its cosine
    for a in range(3):
        for k in range(F):
            torch.testing.assert_close(enc[:, a * F + k], torch.sin(2 ** k * math.pi * coords[:, a]))
            torch.testing.assert_close(enc[:, 3 * F + a * F + k], torch.cos(2 ** k * math.pi * coords[:, a]))
    point = torch.tensor([0.5, 0.0, 1.0]).reshape(1, 3, 1, 1, 1)
    got = sincos_encode(point, 2).flatten().tolist()
    want = [1, 0, 0, 0, 0, 0,  # sin: z (k=0, 1), y, x
            0, -1, 1, 1, -1, 1]  # cos
    assert got == pytest.approx(want, abs=1e-6)


def test_sincos_separates_distinct_positions():
    """The k = 0 pair (sin, cos)(pi c) is one-to-one on [0, 1]: distinct voxels get distinct codes."""
    c = torch.linspace(0, 1, 11)
    coords = torch.stack([c, c, c]).reshape(1, 3, 11, 1, 1)
    enc = sincos_encode(coords, 1)[0, :, :, 0, 0].T  # (11, 6)
    dists = torch.cdist(enc, enc) + torch.eye(11)
    assert dists.min() > 0.1


def test_encoding_channels_and_encode_coords_agree():
    coords = _coords()
    assert encoding_channels("raw", 4) == 3 and encoding_channels("sincos", 4) == 24
    for encoding in ("raw", "sincos"):
        for F in (1, 3):
            assert encode_coords(coords, encoding, F).shape[1] == encoding_channels(encoding, F)
    assert torch.equal(encode_coords(coords, "raw", 4), coords)
    assert torch.equal(encode_coords(coords, "sincos", 2), sincos_encode(coords, 2))
    assert encode_coords(coords.double(), "sincos", 2).dtype == torch.float64


def test_encoding_errors():
    with pytest.raises(ValueError, match="encoding must be one of"):
        encoding_channels("fourier", 4)
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode_coords(_coords(), "fourier", 4)
    with pytest.raises(ValueError, match="num_frequencies"):
        sincos_encode(_coords(), 0)
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        sincos_encode(_coords((2, 2, 4, 4, 4)), 2)
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        encode_coords(_coords((3, 4, 4, 4)), "raw", 2)


def test_bodybox_coords_golden():
    # body box z 2..11, y 0..9, x a single voxel at 5; patch of 10 x 4 x 3 starting at (2, 3, 4)
    out = bodybox_coords((10, 4, 3), ((2, 11), (0, 9), (5, 5)), (2, 3, 4))
    assert out.shape == (3, 10, 4, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], np.arange(10) / 9, atol=1e-7)  # 0 at box start, 1 at end
    assert out[0, 0].min() == 0 and out[0, 9].max() == 1
    np.testing.assert_allclose(out[1, 0, :, 0], [3 / 9, 4 / 9, 5 / 9, 6 / 9], atol=1e-7)
    np.testing.assert_allclose(out[2, 0, 0, :], [-1, 0, 1], atol=1e-7)  # one-voxel box divides by 1
    # each channel varies only along its own axis
    assert np.ptp(out[0], axis=0).max() > 0 and np.ptp(out[0], axis=(1, 2)).max() == 0
    assert np.ptp(out[1], axis=(0, 2)).max() == 0 and np.ptp(out[2], axis=(0, 1)).max() == 0


def test_bodybox_coords_outside_box_and_negative_offset():
    out = bodybox_coords((4, 1, 1), ((0, 2), (0, 0), (0, 0)), (-1, 0, 0))
    np.testing.assert_allclose(out[0, :, 0, 0], [-0.5, 0, 0.5, 1.0])
    with pytest.raises(ValueError, match="last voxel 1 < first voxel 3"):
        bodybox_coords((4, 4, 4), ((0, 3), (3, 1), (0, 3)), (0, 0, 0))
    with pytest.raises(ValueError, match="3 positive sizes"):
        bodybox_coords((4, 4), ((0, 3), (0, 3)), (0, 0))
