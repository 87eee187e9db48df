"""Efficiency figures of `anatdiff benchmark gpu`: FLOPs of a known conv layer by hand, MFU against the peak
table, the doubling batch search with out-of-memory, and the benchmark's option errors."""

import pytest
import torch

from jobs.benchmark import main as benchmark_main
from pipeline.benchmarks.efficiency import count_flops, largest_batch, mfu_figures, peak_bf16_tflops


def test_conv3d_flops_equal_the_hand_count():
    b, c_in, c_out, (d, h, w), k = 2, 3, 5, (4, 6, 8), 3
    conv = torch.nn.Conv3d(c_in, c_out, k, padding=1)
    x = torch.randn(b, c_in, d, h, w)
    forward = 2 * b * c_out * d * h * w * c_in * k ** 3          # 2 FLOPs per multiply-add, bias not counted
    assert count_flops(lambda: conv(x)) == forward == 2 * 2 * 5 * 192 * 3 * 27
    # backward: the weight gradient costs a forward again; the input gradient too when the input needs one
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward
    assert count_flops(lambda: conv(x.requires_grad_()).sum().backward()) == 3 * forward


def test_strided_conv_and_linear_flops():
    conv = torch.nn.Conv3d(4, 8, 3, stride=2, padding=1)
    x = torch.randn(1, 4, 8, 8, 8)
    assert count_flops(lambda: conv(x)) == 2 * 8 * 4 ** 3 * 4 * 27  # output 4^3 voxels
    linear = torch.nn.Linear(16, 10)
    assert count_flops(lambda: linear(torch.randn(7, 16))) == 2 * 7 * 16 * 10


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0),
                                       ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None),
                                       ("Tesla T4", None), ("cpu", None)])
def test_peak_table(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_mfu_figures_known_and_unknown_card():
    known = mfu_figures("pretrain", 2 * 10 ** 12, 4.0, "NVIDIA H200")
    assert known["pretrain_achieved_tflops"] == pytest.approx(8.0)
    assert known["pretrain_mfu"] == pytest.approx(8.0 / 989.0) and known["pretrain_peak_bf16_tflops"] == 989.0
    unknown = mfu_figures("guide", 10 ** 12, 1.0, "cpu")
    assert "guide_mfu" not in unknown and "PEAK_BF16_TFLOPS" in unknown["guide_mfu_note"]
    assert unknown["guide_achieved_tflops"] == pytest.approx(1.0)


def test_largest_batch_doubles_until_out_of_memory():
    tried = []

    def fits(batch):
        tried.append(batch)
        if batch > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return True

    assert largest_batch(fits) == 8 and tried == [1, 2, 4, 8, 16]
    assert largest_batch(lambda b: b < 5) == 4
    assert largest_batch(lambda b: True, start=2, limit=40) == 32
    assert largest_batch(lambda b: False) == 0
    with pytest.raises(ValueError):  # any other error is a real failure, not "does not fit"
        largest_batch(lambda b: (_ for _ in ()).throw(ValueError("bug")))


def test_benchmark_options_belong_to_their_benchmark(capsys):
    assert benchmark_main(["patches", "--objective", "restorative"]) == 2
    assert "--objective applies to `anatdiff benchmark train` only" in capsys.readouterr().err
    assert benchmark_main(["train", "--device", "cpu"]) == 2
    assert "--device applies to `anatdiff benchmark gpu` only" in capsys.readouterr().err
