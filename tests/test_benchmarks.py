"""`anatdiff benchmark preprocess|patches --quick`: the JSON figures exist and are finite positive numbers.

Benchmarks print numbers; tests never assert timings (2 shared cores make them noisy)."""

import json
import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]


def assert_figures(figures: dict, keys: tuple[str, ...]) -> None:
    json.dumps(figures)  # the CLI prints it as one JSON line
    for key in keys:
        assert key in figures, f"missing figure '{key}' in {sorted(figures)}"
    numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    bad = {k: v for k, v in numbers.items() if not math.isfinite(v) or v < 0}
    assert not bad, f"figures must be finite and >= 0: {bad}"
    assert all(numbers[k] > 0 for k in keys), {k: numbers[k] for k in keys}


def test_preprocess_benchmark_quick(tmp_path):
    from pipeline.benchmarks.preprocess import run

    figures = run(workdir=tmp_path, quick=True)
    assert_figures(figures, ("ray_vs_single_process", "preprocess_vs_read", "peak_rss_ratio",
                             "single_volumes_per_s", "ray_volumes_per_s", "single_mb_per_s", "ray_mb_per_s",
                             "read_s_per_volume", "resample_s_per_volume", "write_s_per_volume",
                             "big_peak_rss_mb", "big_raw_mb"))
    assert figures["accepted_single"] == figures["accepted_ray"] == figures["volumes"] == 6
    assert figures["big_raw_mb"] == pytest.approx(120 * 512 * 512 * 2 / 1e6)
    assert figures["big_peak_rss_mb"] > figures["big_rss_after_imports_mb"]  # the scan itself costs memory


def test_patches_benchmark_quick(tmp_path):
    from pipeline.benchmarks.patches import run

    figures = run(workdir=tmp_path, quick=True)
    assert_figures(figures, ("patches_per_s_per_core", "patch_stream_vs_dataloader",
                             "patch_stream_patches_per_s_per_core", "ray_data_patches_per_s_per_core",
                             "dataloader_naive_patches_per_s_per_core", "dataloader_mmap_patches_per_s_per_core"))
    assert figures["volumes"] == 4 and figures["patch_size_zyx"] == [32, 32, 32]
