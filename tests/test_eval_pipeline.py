"""Acceptance of issue 6 on a local Ray instance: phantoms (nnU-Net/MSD layout) + the two real BTCV cases of
one patient (BTCV layout) in one labelled folder -> 3-fold nonlinear evaluation with child runs -> compare ->
export, all through MLflow. Tiny: 6 mm volumes, a random-init backbone (``objective: none``), few head steps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.config import (CompareConfig, EvaluateConfig, ExportConfig, PreprocessConfig, PretrainConfig,
                             SynthConfig, load_config)
from pipeline.labels import ORGANS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
REAL = Path(__file__).parent / "data" / "real-ct" / "abdomen_btcv"
PATIENT = "btcv-patient-1"


def _merge(folders: dict[str, Path], out: Path, patient_keys: dict[str, str]) -> Path:
    """One preprocessed folder from several: files copied under <name>/, manifest paths prefixed."""
    frames = []
    for name, folder in folders.items():
        shutil.copytree(folder, out / name, ignore=shutil.ignore_patterns("manifest.parquet"))
        df = pd.read_parquet(folder / "manifest.parquet")
        for col in ("image_path", "mask_path", "label_path"):
            df[col] = [None if p is None or p != p else f"{name}/{p}" for p in df[col]]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["patient_key"] = [patient_keys.get(src, key) for src, key in zip(df["source"], df["patient_key"])]
    df.to_parquet(out / "manifest.parquet")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    from pipeline.distributed.ingest import run_preprocess
    from pipeline.distributed.pretrain import run_pretrain
    from pipeline.distributed.runtime import init_ray
    from pipeline.synth.corpus import synthesize_corpus

    init_ray(num_cpus=2)
    root = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    synth = SynthConfig(out=str(root / "phantoms"), n=4, seed=1000, labels=True, spacing_mm=6.0)
    synthesize_corpus(synth)
    folders = {}
    for name, source in (("phantoms", synth.out), ("btcv", str(REAL))):
        pp = PreprocessConfig(input=source, output=str(root / "pp" / name), target_spacing_zyx_mm=(6.0, 6.0, 6.0),
                              tracking={"tracking_uri": uri}, log_to_mlflow=False, readable_ids=True)
        run_preprocess(pp)
        folders[name] = Path(pp.output)
    btcv = pd.read_parquet(folders["btcv"] / "manifest.parquet")
    assert (btcv.status == "accepted").sum() == 2 and btcv.label_path.notna().all()
    data = _merge(folders, root / "labeled", {s: PATIENT for s in btcv["source"]})
    pre = run_pretrain(load_config(PretrainConfig, "pretrain-tiny", {
        "data": str(folders["phantoms"]), "objective": "none", "run_name": "rand", "registered_model": None,
        "model": {"channels": [8, 16], "time_embed_dim": 16}, "patches": {"patch_size_zyx": [16, 16, 16]},
        "storage_path": str(root / "runs"), "tracking": {"tracking_uri": uri}}))
    yield {"root": root, "uri": uri, "data": data, "pretrain": pre["run_id"],
           "real_ids": sorted(btcv.loc[btcv.status == "accepted", "item_id"])}
    ray.shutdown()


def test_kfold_nonlinear_with_real_cases(setup):
    from pipeline.distributed.evaluate import run_evaluate

    uri = setup["uri"]
    cfg = load_config(EvaluateConfig, "evaluate-kfold-tiny", {
        "data": str(setup["data"]), "pretrain_run_id": setup["pretrain"], "folds": 3, "head": {"steps": 4, "windows_per_volume": 2},
        "compare_random_init": True, "hd95": True, "tracking": {"tracking_uri": uri}})
    res = run_evaluate(cfg)
    real = setup["real_ids"]
    for fold in res["folds"]:                                         # one patient: same split, always
        for split in ("train", "val", "test"):
            assert (real[0] in fold[split]) == (real[1] in fold[split])
    assert sorted(res["test_ids"]) == sorted(pd.read_parquet(setup["data"] / "manifest.parquet")
                                             .query("status == 'accepted'").item_id)
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(res["run_id"])
    m = parent.data.metrics
    for organ in ORGANS:
        for key in (f"dice_{organ}", f"dice_{organ}_std", f"random_init_dice_{organ}"):
            assert key in m
    assert 0.0 <= m["dice_mean"] <= 1.0 and m["dice_mean_std"] >= 0.0 and "hd95_liver" in m
    assert parent.data.tags["anatdiff.pretrain_run_id"] == setup["pretrain"]
    assert len(res["fold_run_ids"]) == 3
    fold_means = []
    for k, child_id in enumerate(res["fold_run_ids"]):
        child = client.get_run(child_id)
        assert child.data.tags["mlflow.parentRunId"] == res["run_id"] and child.data.tags["anatdiff.fold"] == str(k)
        assert "dice_liver" in child.data.metrics and "random_init_dice_mean" in child.data.metrics
        assert [h.step for h in client.get_metric_history(child_id, "train_loss")] == [1, 2, 3, 4]
        fold_means.append(child.data.metrics["dice_mean"])
    assert m["dice_mean"] == pytest.approx(np.mean(fold_means))
    assert m["dice_mean_std"] == pytest.approx(np.std(fold_means))
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"dice_table.md", "dice_table.csv", "dice_per_case.csv", "dice_per_organ.png", "overlays"} <= arts
    per_case = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res["run_id"], tracking_uri=uri,
                                                               artifact_path="dice_per_case.csv"))
    assert set(real) <= set(per_case["case"])                        # per-organ Dice of the real cases
    assert per_case.loc[per_case["case"] == real[0], "fold"].item() == \
        per_case.loc[per_case["case"] == real[1], "fold"].item()
    for case in real:
        assert f"case_dice_mean.{case}" in m


def test_compare_finds_evaluate_runs_of_a_pretrain_run(setup):
    from pipeline.config import UserError
    from pipeline.evaluation.compare import run_compare

    out = run_compare(CompareConfig(run_ids=(setup["pretrain"],), protocol="nonlinear",
                                    tracking={"tracking_uri": setup["uri"]}))
    assert "| random init |" in out["markdown"] and "## Dice per organ, nonlinear" in out["markdown"]
    run = mlflow.MlflowClient(setup["uri"]).get_run(out["run_id"])
    assert run.data.tags["anatdiff.job"] == "compare"
    assert {a.path for a in mlflow.MlflowClient(setup["uri"]).list_artifacts(out["run_id"])} >= \
        {"compare.md", "compare.csv", "compare.png"}
    with pytest.raises(UserError, match="no finished evaluate run with protocol finetune"):
        run_compare(CompareConfig(run_ids=(setup["pretrain"],), protocol="finetune",
                                  tracking={"tracking_uri": setup["uri"]}))


def test_export_of_a_pretrain_run_registers_and_loads_fresh(setup):
    from pipeline.evaluation.export import run_export

    out = run_export(ExportConfig(run_id=setup["pretrain"], out=str(setup["root"] / "export"),
                                  tracking={"tracking_uri": setup["uri"]}))
    client = mlflow.MlflowClient(setup["uri"])
    assert {a.path for a in client.list_artifacts(setup["pretrain"], "export")} >= \
        {"export/weights.pt", "export/anatdiff_backbone", "export/config.json"}
    version = client.get_model_version_by_alias("anatdiff-backbone-export", "export")
    assert int(version.version) == out["version"] and version.run_id == setup["pretrain"]
    # the copy in MLflow loads in a fresh process, like the local folder
    logged = Path(mlflow.artifacts.download_artifacts(run_id=setup["pretrain"], artifact_path="export",
                                                      dst_path=str(setup["root"] / "downloaded"),
                                                      tracking_uri=setup["uri"]))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import anatdiff_backbone as ab; "
            "m, c = ab.load_backbone(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))")
    counts = []
    for folder in (out["out"], str(logged)):
        proc = subprocess.run([sys.executable, "-I", "-c", code, folder], capture_output=True, text=True,
                              timeout=120, cwd=setup["root"])
        assert proc.returncode == 0, proc.stderr
        counts.append(int(proc.stdout.strip().splitlines()[-1]))
    assert counts[0] == counts[1] > 0
    assert json.loads((Path(out["out"]) / "config.json").read_text())["conventions"]["spacing_zyx_mm"] == [6.0] * 3
