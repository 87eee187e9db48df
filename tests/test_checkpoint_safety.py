"""Checkpoint files are read with ``torch.load(weights_only=True)``: every file anatdiff writes still loads, and a
file that would run code when unpickled is refused with one line, its code never run."""

import pathlib

import pytest
import torch

from pipeline.config import GuideModelConfig, PretrainConfig, UserError
from pipeline.guide.inference import load_guide, load_guide_meta, save_guide
from pipeline.guide.model import build_guide
from pipeline.guide.train import guide_param_groups
from pipeline.models.weights import load_plain
from pipeline.train.checkpoint import load_pretrained, load_state, save_state
from pipeline.train.step import build_model, make_ema


def _cfg() -> PretrainConfig:
    return PretrainConfig.model_validate({"data": "unused", "patches": {"patch_size_zyx": [8, 16, 16]},
                                          "model": {"channels": [8, 16], "time_embed_dim": 16}})


def _one_adamw_step(model: torch.nn.Module, groups=None) -> torch.optim.Optimizer:
    """An AdamW with real state (exp_avg, exp_avg_sq, step tensors), as a training checkpoint holds it."""
    opt = torch.optim.AdamW(groups or model.parameters(), lr=1e-3)
    loss = sum(p.float().square().sum() for p in model.parameters())
    loss.backward()
    opt.step()
    return opt


def test_pretrain_state_and_model_files_load_with_weights_only(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ema = make_ema(model)
    opt = _one_adamw_step(model)
    save_state(tmp_path, model, ema, opt, 3, cfg)
    # what the writer put in the files: tensors and plain data only
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["config"] == cfg.model_dump(mode="json")
    assert state["optimizer"]["state"] and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    restored = load_state(tmp_path)
    opt2 = torch.optim.AdamW(build_model(cfg.model).parameters(), lr=1e-3)
    opt2.load_state_dict(restored["optimizer"])          # resumes like before
    loaded, loaded_cfg = load_pretrained(tmp_path)
    assert loaded_cfg == cfg
    for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_guide_files_load_with_weights_only(tmp_path):
    guide = build_guide(GuideModelConfig(channels=(8, 16), stride=2))
    opt = _one_adamw_step(guide, guide_param_groups(guide, 1e-4))
    # the guide job's checkpoint (pipeline/distributed/guide.py) and its guide.pt
    torch.save({"model": guide.state_dict(), "optimizer": opt.state_dict(), "step": 5}, tmp_path / "state.pt")
    save_guide(tmp_path / "guide.pt", guide, {"step": 5, "config": {"seed": 0, "crop": [64, 64, 64]}})
    assert load_plain(tmp_path / "state.pt")["step"] == 5
    assert load_guide_meta(tmp_path) == {"step": 5, "config": {"seed": 0, "crop": [64, 64, 64]}}
    assert load_guide(tmp_path).config() == guide.config()


class _RunsCode:
    """Unpickling this object calls ``Path.touch(marker)``: what a tampered checkpoint could do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("loader", [load_plain, load_pretrained, load_guide])
def test_a_file_that_would_run_code_is_refused_and_not_run(tmp_path, loader):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "model.pt"
    torch.save({"format": "anatdiff.model/1", "state_dict": {}, "config": _RunsCode(marker)}, bad)
    with pytest.raises(UserError, match="holds more than tensors and plain data, refused"):
        loader(bad)
    assert not marker.exists()
    torch.load(bad, weights_only=False)                  # the same file, loaded the old way, runs the code
    assert marker.exists()
