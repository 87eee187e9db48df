"""Sliding-window prediction: exact stitching, padding of small volumes, window sizes seen by the predictor."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation.heads import NonlinearHead
from pipeline.data.sliding import sliding_window_predict

SHAPE_ZYX = (37, 29, 45)


def _coordinate_volume(shape_zyx=SHAPE_ZYX) -> torch.Tensor:
    """(1, 3, D, H, W): channel a holds the voxel's absolute index along axis a, scaled by 1/10."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) / 10 for n in shape_zyx), indexing="ij")
    return torch.stack(grids)[None]


def _position_predictor(patch: torch.Tensor) -> torch.Tensor:
    """A non-linear function of absolute position: (b, 3, d, h, w) -> (b, 2, d, h, w)."""
    z, y, x = patch[:, 0], patch[:, 1], patch[:, 2]
    return torch.stack([torch.sin(z) * torch.cos(y) + x, torch.tanh(x * y - z)], dim=1)


@pytest.mark.parametrize("blend, overlap", [("gaussian", 0.5), ("uniform", 0.5), ("gaussian", 0.25)])
def test_stitched_output_equals_full_volume_answer(blend, overlap):
    volume = _coordinate_volume()
    seen = []

    def predictor(patch):
        seen.append(tuple(patch.shape))
        return _position_predictor(patch)

    out = sliding_window_predict(volume, predictor, (16, 16, 16), overlap=overlap, batch_size=3, blend=blend)
    assert out.shape == (1, 2, *SHAPE_ZYX)
    torch.testing.assert_close(out, _position_predictor(volume), atol=1e-5, rtol=0)
    assert all(s[0] <= 3 and s[1:] == (3, 16, 16, 16) for s in seen)
    assert len(seen) > 1


def test_window_larger_than_volume_pads_and_crops():
    volume = _coordinate_volume((5, 7, 9))
    seen = []

    def predictor(patch):
        seen.append(tuple(patch.shape[2:]))
        return _position_predictor(patch)

    out = sliding_window_predict(volume, predictor, (16, 16, 16))
    assert out.shape == (1, 2, 5, 7, 9) and seen == [(16, 16, 16)]
    torch.testing.assert_close(out, _position_predictor(volume), atol=1e-5, rtol=0)


def test_per_voxel_head_stitches_exactly():
    """A non-linear head on stride-1 features gives the same answer windowed as on the whole volume."""
    torch.manual_seed(0)
    head = NonlinearHead((4,), hidden=8).eval()
    volume = torch.randn(1, 4, 19, 11, 23)
    with torch.no_grad():
        direct = head([volume])
    out = sliding_window_predict(volume, lambda p: head([p]), (8, 8, 8), batch_size=2)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(volume=torch.zeros(1, 8, 8, 8)), r"\(1, C, D, H, W\)"),
    (dict(window_zyx=(8, 8)), "window_zyx"),
    (dict(overlap=1.0), "overlap"),
    (dict(blend="median"), "blend"),
    (dict(batch_size=0), "batch_size"),
])
def test_sliding_window_errors(kwargs, match):
    args = dict(volume=torch.zeros(1, 1, 8, 8, 8), predictor=lambda p: p, window_zyx=(4, 4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sliding_window_predict(**args)
