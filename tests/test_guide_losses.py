"""Guide losses: golden numbers, invariances the frame is allowed, and what must be penalized."""

import math

import pytest
import torch

from pipeline.guide.losses import consistency_loss, distance_loss, mean_pairwise_distance


def _positions(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor([300.0, 200.0, 250.0])


def test_distance_loss_golden_three_points():
    pos_mm = torch.tensor([[0.0, 0, 0], [3, 0, 0], [0, 4, 0]])        # distances 3, 4, 5 (mean 4)
    pred = torch.tensor([[0.0, 0, 0], [6, 0, 0], [0, 4, 0]])          # distances 6, 4, sqrt(52)
    want = ((6 - 3) ** 2 + 0 + (math.sqrt(52) - 5) ** 2) / 3 / 4 ** 2
    assert distance_loss(pred, pos_mm, torch.ones(3), frame="rigid").item() == pytest.approx(want, rel=1e-6)
    # axes: displacement errors (3, 0, 0), 0, (3, 0, 0) -> squared 9, 0, 9
    assert distance_loss(pred, pos_mm, torch.ones(3), frame="axes").item() == pytest.approx(6 / 16, rel=1e-6)


def test_distance_loss_zero_up_to_scale_offset_and_rotation():
    pos_mm = _positions()
    scale = torch.tensor([800.0, 400.0, 500.0], dtype=torch.float64)
    pred = (pos_mm + torch.tensor([-17.0, 40.0, 3.0], dtype=torch.float64)) / scale   # offset + per-axis scale
    for frame in ("axes", "rigid"):
        assert distance_loss(pred, pos_mm, scale, frame=frame).item() < 1e-12
    c, s = math.cos(0.7), math.sin(0.7)
    rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    assert distance_loss(pos_mm @ rot.T, pos_mm, ones, frame="rigid").item() < 1e-12   # APE: rotation is free
    assert distance_loss(pos_mm @ rot.T, pos_mm, ones, frame="axes").item() > 0.1      # axes: it is not
    flipped = pos_mm * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)            # inferior <-> superior
    assert distance_loss(flipped, pos_mm, ones, frame="axes").item() > 0.1


def test_distance_loss_penalizes_permutation_noise_and_wrong_scale():
    pos_mm = _positions()
    scale = torch.full((3,), 1000.0, dtype=torch.float64)
    pred = pos_mm / scale
    permuted = pred[torch.randperm(len(pred), generator=torch.Generator().manual_seed(1))]
    for frame in ("axes", "rigid"):
        assert distance_loss(permuted, pos_mm, scale, frame=frame).item() > 0.1
    g = torch.Generator().manual_seed(2)
    small = distance_loss(pred + 0.002 * torch.randn(pred.shape, generator=g, dtype=torch.float64), pos_mm, scale)
    large = distance_loss(pred + 0.02 * torch.randn(pred.shape, generator=g, dtype=torch.float64), pos_mm, scale)
    assert 0 < small.item() < large.item()
    # a global scale is NOT free (the learned mm-per-unit fixes it): twice too large -> mean(d^2) / mean(d)^2
    d = torch.pdist(pos_mm)
    want = (d ** 2).mean() / d.mean() ** 2
    assert distance_loss(2 * pred, pos_mm, scale, frame="rigid").item() == pytest.approx(want.item(), rel=1e-9)
    assert distance_loss(2 * pred, pos_mm, scale, frame="axes").item() == pytest.approx(want.item(), rel=1e-9)


def test_distance_loss_batched_is_mean_of_items():
    a, b = _positions(seed=3), _positions(seed=4)
    pred_a, pred_b = a / 900, b / 700
    scale = torch.full((3,), 1000.0, dtype=torch.float64)
    batched = distance_loss(torch.stack([pred_a, pred_b]), torch.stack([a, b]), scale)
    single = (distance_loss(pred_a, a, scale) + distance_loss(pred_b, b, scale)) / 2
    assert batched.item() == pytest.approx(single.item(), rel=1e-9)


@pytest.mark.parametrize("frame", ["axes", "rigid"])
def test_distance_loss_gradient_reaches_axis_scale_without_nans(frame):
    pos_mm = _positions().float()
    log_scale = torch.zeros(3, requires_grad=True)
    pred = (pos_mm / torch.tensor([300.0, 200.0, 250.0])).requires_grad_(True)
    pred_dup = torch.cat([pred, pred[:1]])                                 # a duplicated voxel: distance 0
    loss = distance_loss(pred_dup, torch.cat([pos_mm, pos_mm[:1]]), log_scale.exp() * 100, frame)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(log_scale.grad).all()
    assert (log_scale.grad.abs() > 1e-4).all()


def test_distance_loss_is_exact_at_body_scale_in_float32():
    pos_mm = _positions(n=200).float() + 1500.0                           # far from the origin, float32
    pred = pos_mm / 1000.0
    for frame in ("axes", "rigid"):
        assert distance_loss(pred, pos_mm, torch.full((3,), 1000.0), frame=frame).item() < 1e-8


def test_mean_pairwise_distance_golden():
    pts = torch.tensor([[0.0, 0, 0], [3, 0, 0], [0, 4, 0]])
    assert mean_pairwise_distance(pts).item() == pytest.approx(4.0)


def test_consistency_loss_golden_and_zero():
    a = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    assert consistency_loss(a, a.clone()).item() == 0.0
    b = a + torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert consistency_loss(a, b).item() == pytest.approx(0.09 / 6)


@pytest.mark.parametrize("pred_shape,pos_shape", [((5, 2), (5, 2)), ((1, 3), (1, 3)), ((5, 3), (4, 3))])
def test_distance_loss_rejects_bad_shapes(pred_shape, pos_shape):
    with pytest.raises(ValueError, match="pred_coords|pos_mm"):
        distance_loss(torch.zeros(pred_shape), torch.zeros(pos_shape), torch.ones(3))


def test_bad_axis_scale_frame_and_consistency_shapes_raise():
    with pytest.raises(ValueError, match="frame"):
        distance_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(3), frame="affine")
    with pytest.raises(ValueError, match="axis_scale_mm"):
        distance_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(1))
    with pytest.raises(ValueError, match="pred_a and pred_b"):
        consistency_loss(torch.zeros(4, 3), torch.zeros(5, 3))

