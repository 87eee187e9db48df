"""End to end on a local Ray instance: synth -> preprocess (Ray Data) -> pretrain (Ray Train, 2 CPU workers)
-> evaluate, then the Dice read back from MLflow. Tiny phantoms (6 mm) and a few steps."""

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import EvaluateConfig, PreprocessConfig, PretrainConfig, SynthConfig, load_config
from pipeline.labels import ORGANS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REAL = Path(__file__).parent / "data" / "real-ct"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_session):
    from pipeline.distributed.ingest import run_preprocess
    from pipeline.synth.corpus import synthesize_corpus

    root = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = {"root": root, "uri": uri}
    for name, n, seed, labels in (("unlabeled", 3, 0, False), ("labeled", 4, 1000, True)):
        synth = SynthConfig(out=str(root / "corpus" / name), n=n, seed=seed, labels=labels, spacing_mm=6.0)
        synthesize_corpus(synth)
        pp = PreprocessConfig(input=synth.out, output=str(root / "data" / name),
                              target_spacing_zyx_mm=(6.0, 6.0, 6.0), tracking={"tracking_uri": uri})
        out[name] = (pp.output, run_preprocess(pp))
    return out


@pytest.fixture(scope="module")
def real(corpus):
    """The committed real CT at the corpus's 6 mm: the labelled abdomen (BTCV layout) and the unlabelled chest."""
    from pipeline.distributed.ingest import run_preprocess

    out = {}
    for name in ("abdomen_btcv", "chest"):
        pp = PreprocessConfig(input=str(REAL / name), output=str(corpus["root"] / "data" / name),
                              target_spacing_zyx_mm=(6.0, 6.0, 6.0), tracking={"tracking_uri": corpus["uri"]})
        assert (run_preprocess(pp).status == "accepted").all()
        out[name] = pp.output
    return out


def _assert_guide_scores(metrics: dict, name: str, labelled: bool) -> None:
    """Every per-dataset score of the guide job is there for ``name`` and is a finite non-negative number."""
    keys = ["guide_consistency_mm", "guide_consistency_mm_bodybox"]
    keys += [f"{k}_{a}" for k in keys for a in "zyx"]
    if labelled:
        frames = ["guide_landmark_spread", "guide_landmark_spread_bodybox", "guide_landmark_spread_scanner",
                  "guide_spread_vs_bodybox"]
        keys += frames + [f"{k}_{a}" for k in frames for a in "zyx"]
        keys += [f"guide_organ_mm{k}_{a}" for k in ("", "_anatomy", "_ratio") for a in "zyx"]
    for key in keys:
        value = metrics[f"{key}.{name}"]
        assert np.isfinite(value) and value >= 0, (key, name, value)
    if labelled:       # organs lie centimetres apart along every axis, in the anatomy's mm
        assert all(metrics[f"guide_organ_mm_anatomy_{a}.{name}"] > 10 for a in "zyx")
        ratio = metrics[f"guide_spread_vs_bodybox.{name}"]
        assert ratio == pytest.approx(metrics[f"guide_landmark_spread.{name}"]
                                      / metrics[f"guide_landmark_spread_bodybox.{name}"])


def test_preprocess_accepts_phantoms(corpus):
    for name, n in (("unlabeled", 3), ("labeled", 4)):
        folder, manifest = corpus[name]
        accepted = manifest[manifest.status == "accepted"]
        assert len(accepted) == n, manifest[["source", "status", "reason"]]
        for rel in accepted.image_path:
            vol = np.load(Path(folder) / rel)
            assert vol.dtype == np.int16 and vol.ndim == 3
        assert pd.read_parquet(Path(folder) / "manifest.parquet").shape[0] == len(manifest)
    labeled = corpus["labeled"][1]
    assert labeled[labeled.status == "accepted"].label_path.notna().all()


def test_pretrain_then_evaluate_logs_dice(corpus):
    from pipeline.distributed.evaluate import run_evaluate
    from pipeline.distributed.pretrain import run_pretrain

    root, uri = corpus["root"], corpus["uri"]
    pt = load_config(PretrainConfig, "pretrain-tiny", {
        "data": corpus["unlabeled"][0], "run_name": "e2e", "storage_path": str(root / "runs"),
        "patches": {"patch_size_zyx": [16, 16, 16]}, "optim": {"steps": 4, "warmup_steps": 1},
        "checkpoint_every": 2, "log_every": 2, "tracking": {"tracking_uri": uri}})
    pre = run_pretrain(pt)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(pre["run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(pre["run_id"], "loss")]
    assert steps == [2, 4]
    assert run.data.params["model.guidance"] == "bodybox"
    # the registered backbone has an MLflow flavour: a fresh process loads the module with the final weights
    script = ("import sys, mlflow, torch; mlflow.set_tracking_uri(sys.argv[1]); "
              "m = mlflow.pytorch.load_model('models:/anatdiff-backbone@final'); "
              "sd = torch.load(sys.argv[2], map_location='cpu', weights_only=True); "
              "print('SAME', all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items()))")
    local = mlflow.artifacts.download_artifacts(f"runs:/{pre['run_id']}/model/model.pt", tracking_uri=uri,
                                                dst_path=str(root / "dl"))
    weights = root / "final_weights.pt"
    torch.save(torch.load(local, map_location="cpu", weights_only=False)["state_dict"], weights)
    done = subprocess.run([sys.executable, "-c", script, uri, str(weights)], capture_output=True, text=True,
                          timeout=240, cwd=root)
    assert "SAME True" in done.stdout, done.stderr[-2000:]

    ev = load_config(EvaluateConfig, "evaluate-tiny", {
        "data": corpus["labeled"][0], "pretrain_run_id": pre["run_id"],
        "head": {"steps": 3, "windows_per_volume": 2}, "ceiling": {"steps": 2, "val_every": 0},
        "tracking": {"tracking_uri": uri}})
    res = run_evaluate(ev)
    erun = client.get_run(res["run_id"])
    assert erun.data.tags["anatdiff.pretrain_run_id"] == pre["run_id"]
    metrics = erun.data.metrics
    for organ in ORGANS:
        assert f"dice_{organ}" in metrics and f"random_init_dice_{organ}" in metrics
        assert f"ceiling_dice_{organ}" in metrics                   # the supervised ceiling row
    assert 0.0 <= metrics["dice_mean"] <= 1.0 and 0.0 <= metrics["ceiling_dice_mean"] <= 1.0
    assert "supervised ceiling" in res["table"]
    assert "| liver |" in res["table"] or "liver" in res["table"]


@pytest.mark.slow
def test_guide_then_learned_guidance(corpus, real):
    """train-guide (2 workers) on phantoms + real chest CT -> scored per dataset (phantoms, real abdomen,
    chest) -> pretrain with guidance: learned -> evaluate tags the guide run."""
    from pipeline.config import GuideConfig
    from pipeline.distributed.evaluate import run_evaluate
    from pipeline.distributed.guide import run_guide
    from pipeline.distributed.pretrain import run_pretrain

    root, uri = corpus["root"], corpus["uri"]
    gc = load_config(GuideConfig, "guide-real-tiny", {
        "data": [corpus["unlabeled"][0], real["chest"]], "data_weights": [1, 1],
        "eval_data": [f"phantoms={corpus['labeled'][0]}", f"abdomen={real['abdomen_btcv']}"],
        "real_data": f"chest={real['chest']}", "consistency_views": 1, "run_name": "e2e-guide",
        "storage_path": str(root / "runs"), "crop_size_zyx": [16, 16, 16], "optim": {"steps": 4},
        "checkpoint_every": 2, "log_every": 2, "tracking": {"tracking_uri": uri}})
    guide = run_guide(gc)
    client = mlflow.MlflowClient(uri)
    grun = client.get_run(guide["run_id"])
    metrics = grun.data.metrics
    _assert_guide_scores(metrics, "phantoms", labelled=True)
    _assert_guide_scores(metrics, "abdomen", labelled=True)
    _assert_guide_scores(metrics, "chest", labelled=False)
    for key in ("guide_landmark_spread", "guide_landmark_spread_bodybox", "guide_organ_mm_ratio_z"):
        assert metrics[key] == metrics[f"{key}.phantoms"]          # the first labelled set, also unsuffixed
    guide_keys = [k for k in metrics if k.startswith("guide_")]
    assert not any("/" in k or "real-ct" in k or "abdomen_btcv" in k for k in guide_keys)   # names, never paths
    assert int(grun.data.params["n_volumes"]) == 3 + 2
    assert [a.path for a in client.list_artifacts(guide["run_id"], "guide")] == ["guide/config.yaml",
                                                                                  "guide/guide.pt"]
    pt = load_config(PretrainConfig, "pretrain-tiny", {
        "data": corpus["unlabeled"][0], "run_name": "e2e-learned", "storage_path": str(root / "runs"),
        "patches": {"patch_size_zyx": [16, 16, 16]}, "optim": {"steps": 2, "warmup_steps": 1},
        "checkpoint_every": 2, "log_every": 2, "tracking": {"tracking_uri": uri},
        "model": {"guidance": "learned", "guide_checkpoint": f"runs:/{guide['run_id']}"}})
    pre = run_pretrain(pt)
    coords = list((Path(corpus["unlabeled"][0]) / "coords").glob("*/*.npy"))
    assert len(coords) == 3 and np.load(coords[0]).shape[0] == 3
    ev = load_config(EvaluateConfig, "evaluate-tiny", {
        "data": corpus["labeled"][0], "pretrain_run_id": pre["run_id"],
        "head": {"steps": 2, "windows_per_volume": 2}, "ceiling": None, "compare_random_init": False, "tracking": {"tracking_uri": uri}})
    tags = client.get_run(run_evaluate(ev)["run_id"]).data.tags
    assert tags["anatdiff.guide_run_id"] == guide["run_id"]
    assert tags["anatdiff.pretrain_run_id"] == pre["run_id"]


@pytest.mark.slow
def test_bpr_guide_job_is_scored_on_real_scans(corpus, real, tmp_path):
    """guidance kind bpr: the same job trains the 1-D body-part regressor and scores it like the 3-D guide."""
    from pipeline.config import GuideConfig
    from pipeline.distributed.guide import run_guide
    from pipeline.guide.bpr import BodyPartRegressor
    from pipeline.guide.inference import load_guide, predict_coords

    uri = corpus["uri"]
    gc = load_config(GuideConfig, "guide-real-tiny", {
        "kind": "bpr", "data": [corpus["unlabeled"][0], real["chest"]],
        "eval_data": f"abdomen={real['abdomen_btcv']}", "consistency_views": 1, "bpr_slices": 4,
        "bpr_slice_size": 32, "run_name": "e2e-bpr", "storage_path": str(corpus["root"] / "runs"),
        "optim": {"steps": 2}, "checkpoint_every": 2, "log_every": 1, "tracking": {"tracking_uri": uri}})
    out = run_guide(gc)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(out["run_id"])
    assert run.data.tags["anatdiff.guide_kind"] == "bpr"
    _assert_guide_scores(run.data.metrics, "abdomen", labelled=True)
    assert [m.step for m in client.get_metric_history(out["run_id"], "distance_loss")] == [1, 2]
    guide = load_guide(client.download_artifacts(out["run_id"], "guide/guide.pt", str(tmp_path)))
    assert isinstance(guide, BodyPartRegressor) and guide.slice_size == 32
    volume = np.load(next((Path(real["chest"]) / "volumes").glob("*.npy")))
    coords = predict_coords(guide, volume)
    assert coords.shape == (3, *volume.shape) and np.ptp(coords[0], axis=(1, 2)).max() == 0   # a score per slice
