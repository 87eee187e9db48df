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
    out = figures(torch.device("cpu"), pretrain, guide, steps=1, fit_steps=10, with_compile=False, batch_limit=1,
                  crop_seconds=0.2)
    assert out["device"] == "cpu" and not torch.distributed.is_initialized()
    for key in ("pretrain_fp32_steps_per_s", "pretrain_bf16_steps_per_s", "pretrain_loss_first",
                "pretrain_loss_last", "guide_steps_per_s", "guide_loss_first", "guide_loss_last"):
        assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    for key in ("pretrain_tflop_per_step", "pretrain_achieved_tflops", "guide_tflop_per_step",
                "guide_achieved_tflops", "guide_crop_pairs_per_s_per_core", "guide_cores_to_feed"):
        assert math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    assert out["pretrain_largest_batch"] == out["guide_largest_batch"] == 1  # no OOM on the CPU: the limit
    assert "pretrain_mfu" not in out and "cpu" in out["pretrain_mfu_note"]  # no bf16 peak for a CPU
    # same weights, batch and noise: bf16 autocast changes the loss by rounding only
    assert out["pretrain_bf16_vs_fp32_loss_rel"] < 0.05
