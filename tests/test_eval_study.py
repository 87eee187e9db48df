"""`anatdiff study` smoke run (slow): two variants, two protocols, a few steps; ends with the comparison."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.config import StudyConfig, load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


def test_study_preset_is_valid_and_covers_the_four_variants():
    cfg = load_config(StudyConfig, "study-phantom-small")
    assert cfg.variants == ("random_init", "restorative", "unguided", "guided")
    assert cfg.protocols == ("linear", "nonlinear", "finetune") and cfg.evaluate_preset == "evaluate-kfold-tiny"


def test_pretrain_overrides_differ_only_by_variant():
    from pipeline.distributed.study import pretrain_overrides

    cfg = load_config(StudyConfig, "study-phantom-small")
    over = {v: pretrain_overrides(cfg, v, "d", f"r-{v}", "s", "GUIDE") for v in cfg.variants}
    assert over["random_init"]["objective"] == "none" and over["restorative"]["objective"] == "restorative"
    assert over["unguided"]["model"]["guidance"] == "none"
    assert over["guided"]["model"] == {"guidance": "learned", "guide_checkpoint": "runs:/GUIDE"}
    assert {o["optim"]["steps"] for o in over.values()} == {cfg.pretrain["optim"]["steps"]}   # one budget


def test_study_smoke(tmp_path):
    import ray

    from pipeline.distributed.study import run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(StudyConfig, "study-phantom-small", {
        "workdir": str(tmp_path / "study"), "n_unlabeled": 2, "n_labeled": 3,
        "target_spacing_zyx_mm": [8.0, 8.0, 8.0], "variants": ["random_init", "guided"],
        "guided_guidance": "bodybox", "protocols": ["linear", "finetune"], "num_cpus": 2,
        "pretrain": {"optim": {"steps": 2, "warmup_steps": 1}, "checkpoint_every": 2, "log_every": 1,
                     "registered_model": None, "patches": {"patch_size_zyx": [16, 16, 16]},
                     "model": {"channels": [8, 16]}},
        "evaluate": {"folds": 3, "val_cases": 0, "head": {"steps": 2, "windows_per_volume": 2},
                     "finetune": {"steps": 2}, "overlays": 0},
        "tracking": {"tracking_uri": uri}})
    try:
        out = run_study(cfg)
    finally:
        ray.shutdown()
    assert set(out["evaluate_runs"]) == {(v, p) for v in ("random_init", "guided") for p in ("linear", "finetune")}
    md = out["compare"]["markdown"]
    assert "| random init |" in md and "| diffusion (body-box guide) |" in md and "finetune" in md
    client = mlflow.MlflowClient(uri)
    for run_id in out["evaluate_runs"].values():
        assert client.get_run(run_id).data.params["n_folds"] == "3"
    print("study smoke seconds:", {k: round(v) for k, v in out["seconds"].items()})
