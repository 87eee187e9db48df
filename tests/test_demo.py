"""`anatdiff demo` end to end in a tiny configuration: every stage runs and the verdict the user reads is there."""

from __future__ import annotations

import mlflow
import pytest
import SimpleITK as sitk

from pipeline.config import DemoConfig, load_config


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_demo_smoke_every_stage_and_the_verdict(tmp_path, capsys):
    import ray

    from pipeline.distributed.demo import run_demo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny_net = {"channels": [8, 16]}
    cfg = load_config(DemoConfig, "demo", {
        "workdir": str(tmp_path / "demo"), "n_unlabeled": 2, "n_labeled": 3, "n_probe": 2,
        "target_spacing_zyx_mm": [8.0, 8.0, 8.0],
        "pretrain": {"max_seconds": 120, "optim": {"steps": 4, "warmup_steps": 1}, "checkpoint_every": 2,
                     "log_every": 1, "patches": {"patch_size_zyx": [16, 16, 16]}, "model": tiny_net,
                     "probe": {"every": 2, "head_steps": 2, "windows_per_volume": 1}},
        "evaluate": {"head": {"steps": 3, "windows_per_volume": 2, "val_every": 0},
                     "ceiling": {"steps": 2, "val_every": 0}, "overlays": 1},
        "segmenter": {"head": {"steps": 3, "windows_per_volume": 2}},
        "tracking": {"tracking_uri": uri}})
    try:
        out = run_demo(cfg)
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[{stage}/7]" in printed, printed[-3000:]
    assert "Dice on held-out phantoms" in printed and "| **mean** |" in printed
    assert "pretrained non-linear head: mean Dice" in printed and "random init, same head:" in printed
    assert "supervised ceiling (same network, all weights from scratch" in printed
    per = out["evaluate"]["per_organ"]
    assert set(per) == {"pretrained", "random_init", "ceiling"}
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("anatdiff-segmenter", "demo")
    assert version.run_id == out["segmenter"]["segmenter"]["run_id"]
    labels = sorted((tmp_path / "demo" / "predictions").glob("*.nii.gz"))
    assert len(labels) == 4                                   # two real abdomen crops and two chest scans
    chest = [p for p in labels if p.name.startswith("radiomics_lung1")][0]
    image = sitk.ReadImage("tests/data/real-ct/chest/radiomics_lung1_ct_4x.nrrd")
    label = sitk.ReadImage(str(chest))
    assert label.GetSize() == image.GetSize() and label.GetSpacing() == pytest.approx(image.GetSpacing())
    assert label.GetOrigin() == pytest.approx(image.GetOrigin())
