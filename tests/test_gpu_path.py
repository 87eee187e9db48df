"""The code of `anatdiff benchmark gpu` (DDP-wrapped pretraining and guide steps under bf16 autocast) runs
on the CPU in tiny configs (gloo instead of nccl), so the GPU check cannot rot between GPU sessions."""

import math

import torch

from pipeline.benchmarks.gpu import figures
from pipeline.config import GuideConfig, PretrainConfig, load_config


def test_gpu_benchmark_code_runs_on_cpu_in_tiny_configs():
    pretrain = load_config(PretrainConfig, "pretrain-tiny", overrides={"data": "unused", "optim": {"batch_size": 1}})
    guide = load_config(GuideConfig, "guide-tiny", overrides={"data": "unused", "optim": {"batch_size": 1},
                                                              "crop_size_zyx": [32, 32, 32],
                                                              "scan_end_probability": 0.5})
    out = figures(torch.device("cpu"), pretrain, guide, steps=1, fit_steps=10, with_compile=False)
    assert out["device"] == "cpu" and not torch.distributed.is_initialized()
    for key in ("pretrain_fp32_steps_per_s", "pretrain_bf16_steps_per_s", "pretrain_loss_first",
                "pretrain_loss_last", "guide_steps_per_s", "guide_loss_first", "guide_loss_last"):
        assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    # same weights, batch and noise: bf16 autocast changes the loss by rounding only
    assert out["pretrain_bf16_vs_fp32_loss_rel"] < 0.05
