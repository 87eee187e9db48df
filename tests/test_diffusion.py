"""Diffusion math against closed forms and golden numbers (in the spirit of diffusers' SchedulerCommonTest):
schedules, the forward process, eps/v/x0 conversions, the loss and the DDIM sampler."""

import math

import pytest
import torch

from pipeline.config import DiffusionConfig
from pipeline.diffusion.objective import (diffusion_loss, from_model_range, sample_timesteps,
                                          to_model_range)
from pipeline.diffusion.sampler import ddim_sample, ddim_timesteps
from pipeline.diffusion.schedules import (DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule,
                                          predict_eps_from_v, predict_eps_from_x0, predict_x0_from_eps,
                                          predict_x0_from_v, q_sample, v_target)

COSINE = DiffusionSchedule.from_config(DiffusionConfig(timesteps=1000, schedule="cosine"))
LINEAR = DiffusionSchedule.from_config(DiffusionConfig(timesteps=1000, schedule="linear"))


# ------------------------------------------------------------------------------------------- schedules
def test_linear_betas_golden():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert betas[500].item() == pytest.approx(1e-4 + 500 / 999 * (0.02 - 1e-4), rel=1e-12)
    short = linear_beta_schedule(100)  # improved DDPM: scaled by 1000 / T
    assert short[0].item() == pytest.approx(1e-3) and short[-1].item() == pytest.approx(0.2)
    assert LINEAR.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_alphas_cumprod_closed_form():
    T, s = 1000, 0.008

    def f(t):
        return math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2

    abar = COSINE.alphas_cumprod
    for t in (0, 1, 10, 250, 500, 900, 998):  # index t holds abar after t + 1 noising steps
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5, abs=1e-9)
    betas = cosine_beta_schedule(T)
    assert betas[0].item() == pytest.approx(4.1284e-5, rel=1e-4)
    assert betas[-1].item() == 0.999  # clipped (f(T) = 0)
    assert betas.max().item() <= 0.999


@pytest.mark.parametrize("schedule", [COSINE, LINEAR], ids=["cosine", "linear"])
def test_schedule_invariants(schedule):
    abar = schedule.alphas_cumprod
    assert schedule.num_timesteps == 1000 and abar.dtype == torch.float32
    assert bool((abar[1:] < abar[:-1]).all())
    assert abar[0].item() > 0.9998 and abar[-1].item() < 5e-5
    torch.testing.assert_close(schedule.sqrt_alphas_cumprod ** 2 + schedule.sqrt_one_minus_alphas_cumprod ** 2,
                               torch.ones(1000))
    torch.testing.assert_close(abar, torch.cumprod(1 - schedule.betas.double(), 0).float())
    assert schedule.to("cpu") is schedule


def test_schedule_errors():
    with pytest.raises(ValueError, match="T"):
        linear_beta_schedule(0)
    with pytest.raises(ValueError, match="T"):
        cosine_beta_schedule(0)
    with pytest.raises(ValueError, match="betas"):
        DiffusionSchedule.from_betas(torch.tensor([0.1, 1.0]))


# ------------------------------------------------------------------------------------ forward process
def test_q_sample_statistics():
    """Constant x0 = 0.5 over 200k noise draws: mean sqrt(abar) * 0.5, variance 1 - abar."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4, 50_000), 0.5)
    t = torch.tensor([0, 100, 500, 900])
    x_t = q_sample(x0, t, torch.randn(x0.shape, generator=g), COSINE)
    abar = COSINE.alphas_cumprod[t].double()
    torch.testing.assert_close(x_t.double().mean(1), abar.sqrt() * 0.5, atol=0.01, rtol=0)
    torch.testing.assert_close(x_t.double().var(1), 1 - abar, atol=0.01, rtol=0.02)


def test_conversions_are_mutually_inverse():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((5, 1, 4, 4, 4), generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 900, 990])
    x_t = q_sample(x0, t, eps, COSINE)
    v = v_target(x0, eps, t, COSINE)
    torch.testing.assert_close(predict_x0_from_v(x_t, t, v, COSINE), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(predict_eps_from_v(x_t, t, v, COSINE), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(predict_x0_from_eps(x_t, t, eps, COSINE), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(predict_eps_from_x0(x_t, t, x0, COSINE), eps, atol=2e-4, rtol=0)
    # v golden: at abar = 1/2, v = (eps - x0) / sqrt(2)
    t_half = int((COSINE.alphas_cumprod - 0.5).abs().argmin())
    a = COSINE.alphas_cumprod[t_half].item()
    vv = v_target(torch.ones(1, 1), torch.full((1, 1), 3.0), torch.tensor([t_half]), COSINE)
    assert vv.item() == pytest.approx(math.sqrt(a) * 3 - math.sqrt(1 - a), abs=1e-6)


# ---------------------------------------------------------------------------------------------- loss
def test_model_range_golden():
    x01 = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(to_model_range(x01), torch.tensor([-1.0, -0.5, 1.0]))
    torch.testing.assert_close(from_model_range(to_model_range(x01)), x01)


def test_sample_timesteps_uniform_and_seeded():
    t = sample_timesteps(20_000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 999
    assert abs(t.double().mean().item() - 499.5) < 8
    assert torch.equal(t, sample_timesteps(20_000, 1000, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="T=0"):
        sample_timesteps(2, 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_diffusion_loss_oracle_zero_and_zero_model_positive(prediction):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand((3, 1, 8, 8, 8), generator=g) * 2 - 1

    def oracle(x_t, t):
        eps = predict_eps_from_x0(x_t, t, x0, COSINE)
        return eps if prediction == "epsilon" else v_target(x0, eps, t, COSINE)

    t = torch.tensor([5, 400, 800])
    loss, info = diffusion_loss(oracle, x0, COSINE, prediction=prediction, t=t, generator=g)
    assert loss.item() < 1e-6 and torch.equal(info["t"], t) and info["loss_per_sample"].shape == (3,)
    zero_loss, _ = diffusion_loss(lambda x_t, t: torch.zeros_like(x_t), x0, COSINE, prediction=prediction,
                                  generator=g)
    assert zero_loss.item() > 0.1
    if prediction == "epsilon":  # E[eps^2] = 1
        assert zero_loss.item() == pytest.approx(1.0, abs=0.1)


def test_diffusion_loss_errors():
    x0 = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="prediction"):
        diffusion_loss(lambda x, t: x, x0, COSINE, prediction="x0")
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(lambda x, t: x[:, :, :2], x0, COSINE)


# ---------------------------------------------------------------------------------------------- DDIM
def test_ddim_timesteps_golden():
    assert ddim_timesteps(999, 4) == [999, 666, 333, 0]
    assert ddim_timesteps(10, 1) == [10]
    assert ddim_timesteps(3, 4) == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(3, 5)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_oracle_returns_x0(prediction):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand((2, 1, 4, 4, 4), generator=g) * 2 - 1

    def oracle(x_t, t):
        eps = predict_eps_from_x0(x_t, t, x0, COSINE)
        return eps if prediction == "epsilon" else v_target(x0, eps, t, COSINE)

    out = ddim_sample(oracle, x0.shape, COSINE, steps=20, prediction=prediction, generator=g)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    # denoise a partially noised input from t = 300
    x_t = q_sample(x0, torch.tensor([300, 300]), torch.randn(x0.shape, generator=g), COSINE)
    out = ddim_sample(oracle, None, COSINE, steps=10, prediction=prediction, x_T=x_t, t_start=300)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_samples_a_gaussian_data_distribution():
    """Data x0 ~ N(m, s^2): the exact eps-predictor is E[eps | x_t] = b (x_t - a m) / (a^2 s^2 + b^2);
    deterministic DDIM from N(0, 1) must reproduce mean m and std s (checks every update coefficient)."""
    m, s = 0.3, 0.2

    def posterior_eps(x_t, t):
        a = COSINE.sqrt_alphas_cumprod[t].reshape(-1, 1)
        b = COSINE.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1)
        return b * (x_t - a * m) / (a ** 2 * s ** 2 + b ** 2)

    def sample(steps, eta=0.0, seed=4):
        return ddim_sample(posterior_eps, (1, 20_000), COSINE, steps=steps, eta=eta,
                           generator=torch.Generator().manual_seed(seed), clip_x0=False)

    out = sample(200)
    assert out.mean().item() == pytest.approx(m, abs=0.01)
    assert out.std().item() == pytest.approx(s, abs=0.01)
    assert torch.equal(out, sample(200))
    # few DDIM steps lose variance (a known discretisation bias); more steps converge towards s
    stds = [sample(steps).std().item() for steps in (10, 50, 200)]
    assert stds[0] < stds[1] < stds[2]
    noisy = sample(200, eta=1.0)
    assert noisy.mean().item() == pytest.approx(m, abs=0.01)
    assert noisy.std().item() == pytest.approx(s, abs=0.01)


def test_ddim_errors():
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(lambda x, t: x, (1, 2), COSINE, eta=-1)
    with pytest.raises(ValueError, match="t_start"):
        ddim_sample(lambda x, t: x, (1, 2), COSINE, t_start=1000)
    with pytest.raises(ValueError, match="prediction"):
        ddim_sample(lambda x, t: x, (1, 2), COSINE, prediction="x0")
