"""The 3D UNet denoiser: shapes for both injections, features for heads, conditioning reaches the output,
memory formats and autocast, input errors, and that it can learn to denoise one patch."""

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.diffusion.objective import diffusion_loss
from pipeline.diffusion.schedules import DiffusionSchedule, cosine_beta_schedule
from pipeline.models.blocks import num_groups, sinusoidal_embedding
from pipeline.models.unet3d import UNet3D, build_denoiser

SHAPE = (2, 1, 16, 16, 8)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (the output conv and FiLM convs start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(cond_channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 700])
    cond = torch.rand((SHAPE[0], cond_channels, *SHAPE[2:]), generator=g) if cond_channels else None
    return x, t, cond


@pytest.mark.parametrize("injection", ["concat", "film"])
@pytest.mark.parametrize("time_dim", [32, None])
def test_shapes_and_features(injection, time_dim):
    model = UNet3D(1, 2, channels=(8, 16, 24), blocks_per_level=2, time_embed_dim=time_dim,
                   cond_channels=6, cond_injection=injection)
    x, t, cond = _inputs(6)
    out, feats = model(x, t if time_dim else None, cond, return_features=True)
    assert out.shape == (2, 2, 16, 16, 8) and out.dtype == torch.float32
    assert model.feature_channels == (24, 16, 8) and model.feature_strides == (4, 2, 1)
    assert len(feats) == 3
    for f, c, s in zip(feats, model.feature_channels, model.feature_strides):
        assert f.shape == (2, c, 16 // s, 16 // s, 8 // s)
    assert torch.equal(model(x, t if time_dim else None, cond), out)


@pytest.mark.parametrize("injection", ["concat", "film"])
def test_strided_stem_shapes_and_features(injection):
    """stem_stride=2: levels at strides 2, 4, 8 and a full-resolution stage that sees the raw input."""
    model = _randomize(UNet3D(1, 1, channels=(8, 16, 24), time_embed_dim=16, cond_channels=6,
                              cond_injection=injection, stem_stride=2)).eval()
    x, t, cond = _inputs(6)
    out, feats = model(x, t, cond, return_features=True)
    assert out.shape == SHAPE
    assert model.feature_channels == (24, 16, 8, 8) and model.feature_strides == (8, 4, 2, 1)
    for f, c, s in zip(feats, model.feature_channels, model.feature_strides):
        assert f.shape == (2, c, 16 // s, 16 // s, 8 // s)
    # the full-resolution output depends on the voxel itself, not only on its 2x2x2 neighbourhood average
    x2 = x.clone()
    x2[0, 0, 0, 0, 0] += 1.0
    assert (model(x2, t, cond) - model(x, t, cond))[0, 0, 0, 0, 0].abs() > 1e-4
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 1, 16, 16, 4), t[:1], cond[:1, :, :, :, :4])
    with pytest.raises(ValueError, match="stem_stride"):
        UNet3D(1, 1, stem_stride=3)


def test_output_starts_at_zero_and_features_do_not():
    """Zero-initialised output conv (a stable start for eps prediction); features are informative."""
    model = UNet3D(1, 1, channels=(8, 16), time_embed_dim=16)
    x, t, _ = _inputs(0)
    out, feats = model(x, t, return_features=True)
    assert out.abs().max() == 0
    assert all(f.std() > 0.01 for f in feats)


@pytest.mark.parametrize("injection", ["concat", "film"])
def test_conditioning_and_timestep_change_the_output(injection):
    model = _randomize(UNet3D(1, 1, channels=(8, 16), time_embed_dim=16, cond_channels=3,
                              cond_injection=injection)).eval()
    x, t, cond = _inputs(3)
    base = model(x, t, cond)
    assert (model(x, t, cond.flip(2)) - base).abs().mean() > 1e-3
    assert (model(x, torch.tensor([500, 10]), cond) - base).abs().mean() > 1e-3
    # each sample is independent of the other's conditioning (no leakage across the batch)
    cond2 = cond.clone()
    cond2[1] = 0
    assert torch.allclose(model(x, t, cond2)[0], base[0], atol=1e-5)


def test_time_embedding_off_ignores_t():
    model = _randomize(UNet3D(1, 1, channels=(8, 16), time_embed_dim=None)).eval()
    x, t, _ = _inputs(0)
    assert torch.equal(model(x, t), model(x, None))


def test_channels_last_and_autocast():
    model = _randomize(UNet3D(1, 1, channels=(8, 16), time_embed_dim=16, cond_channels=3,
                              cond_injection="film"))
    x, t, cond = _inputs(3)
    ref = model(x, t, cond)
    model_cl = model.to(memory_format=torch.channels_last_3d)
    out = model_cl(x.to(memory_format=torch.channels_last_3d), t, cond.to(memory_format=torch.channels_last_3d))
    out.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, cond)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_input_errors_name_the_problem():
    model = UNet3D(1, 1, channels=(8, 16, 32), time_embed_dim=16, cond_channels=3)
    x, t, cond = _inputs(3)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.zeros(1, 1, 16, 16, 6), t[:1], cond[:1, :, :, :, :6])
    with pytest.raises(ValueError, match="embeds timesteps"):
        model(x, None, cond)
    with pytest.raises(ValueError, match="cond must be"):
        model(x, t, None)
    with pytest.raises(ValueError, match="cond must be"):
        model(x, t, cond[:, :2])
    with pytest.raises(ValueError, match="cond_channels=0"):
        UNet3D(1, 1, channels=(8, 16), time_embed_dim=16)(x, t, cond)
    with pytest.raises(ValueError, match="cond_injection"):
        UNet3D(1, 1, cond_injection="add")
    with pytest.raises(ValueError, match="levels"):
        UNet3D(1, 1, channels=(8,))


def test_build_denoiser_follows_config():
    cfg = ModelConfig(channels=(8, 16), blocks_per_level=2, time_embed_dim=16, guidance_injection="film")
    model = build_denoiser(cfg, in_channels=1, out_channels=1, cond_channels=24)
    assert model.channels == (8, 16) and model.cond_injection == "film" and model.cond_channels == 24
    assert len(model.enc[0]) == 2 and model.time_embed.dim == 16
    x, t, _ = _inputs(0)
    assert model(x, t, torch.zeros(2, 24, 16, 16, 8)).shape == SHAPE


def test_built_denoisers_keep_channels_last_weights_with_unchanged_outputs():
    """``build_denoiser`` returns channels_last_3d weights (oneDNN's and cuDNN's faster 3-D kernels; speed is
    measured by ``anatdiff benchmark``, not here); the same weights laid out contiguously give the same output."""
    cfg = ModelConfig(channels=(8, 16), time_embed_dim=16)
    model = _randomize(build_denoiser(cfg))
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    plain = _randomize(build_denoiser(cfg)).to(memory_format=torch.contiguous_format)
    plain.load_state_dict(model.state_dict())
    x, t, _ = _inputs(0)
    torch.testing.assert_close(model(x, t), plain(x, t), rtol=1e-4, atol=1e-5)
    model2 = build_denoiser(cfg)
    model2.load_state_dict(plain.state_dict())                     # contiguous files load into it unchanged
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d)
               for w in (m.weight for m in model2.modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1)))


def test_blocks_helpers():
    assert [num_groups(c) for c in (1, 4, 8, 12, 16, 24, 6)] == [1, 4, 8, 6, 8, 8, 6]
    emb = sinusoidal_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(5.0)))
    assert sinusoidal_embedding(torch.tensor([1]), 7).shape == (1, 7)


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_learns_to_denoise_one_patch(stem_stride):
    """30 Adam steps on one smooth patch, fresh noise each step at t = 100: the eps loss halves."""
    torch.manual_seed(0)
    z = torch.linspace(-1, 1, 16)
    x0 = (torch.sin(3 * z)[:, None, None] * torch.cos(2 * z)[None, :, None] * z[None, None, :])[None, None]
    schedule = DiffusionSchedule.from_betas(cosine_beta_schedule(1000))
    model = UNet3D(1, 1, channels=(8, 16), time_embed_dim=32, stem_stride=stem_stride)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss, _ = diffusion_loss(model, x0, schedule, t=torch.tensor([100]), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert 0.8 < sum(losses[:3]) / 3 < 1.2  # zero output at start: E[eps^2] = 1
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
