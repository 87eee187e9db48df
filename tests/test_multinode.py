"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``: one raylet per node, 1 CPU each), and a
node lost mid-job.

- preprocess on 3 nodes, one removed while its tasks run: every input is in the manifest exactly once;
- train-guide with 2 workers on 2 nodes: a guide that loads;
- pretraining with elastic ``num_workers: [1, 2]`` on 2 nodes, one removed: the worker group restarts from
  the last checkpoint with the 1 worker the node left can hold, every step to the last is trained once
  after the restart point, and the run carries system metrics.

Predict (being written in another branch) fits the same pattern: add a test that starts ``run_predict`` in a
thread on ``three_nodes``, removes a worker node once some outputs exist, and asserts one output per input
volume (none missing, none written twice: compare the output folder with the input manifest).

The cluster uses its own ``RAY_TMPDIR`` (so no other Ray session on the machine sees it) and fast node-death
detection (health checks every 0.5 s). Timings: see docs/running-on-a-cluster.md ("Many nodes").
"""

import os
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from ingest_helpers import manifest_with_sources
import SimpleITK as sitk

from conftest import write_tiny_corpus
from pipeline.config import GuideConfig, PreprocessConfig, PretrainConfig, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                          "health_check_timeout_ms": 1000}


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU) that the driver joins; tests add worker nodes and remove what they added."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths live below it
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": FAST_FAILURE_DETECTION})
    try:
        c.connect()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        assert not Path(tmp, "ray", "ray_current_cluster").exists()


def _add_nodes(cluster, n: int) -> list:
    nodes = [cluster.add_node(num_cpus=1, include_dashboard=False) for _ in range(n)]
    cluster.wait_for_nodes()
    return nodes


def _remove(cluster, nodes, graceful: bool = True) -> None:
    """Remove worker nodes; ``graceful=False`` kills the raylet and its workers at once (a lost machine)."""
    for node in nodes:
        if node in cluster.worker_nodes:
            cluster.remove_node(node, allow_graceful=graceful)


# ----------------------------------------------------------------------------------------------- preprocess
def _write_inputs(root: Path, n: int) -> None:
    """n small CT-like NIfTI volumes (a water cylinder in air), 1.5 mm, so preprocess resamples each."""
    root.mkdir(parents=True)
    z, y, x = np.ogrid[:48, :64, :64]
    body = ((y - 32) ** 2 + (x - 32) ** 2 < 26 ** 2) & (z >= 0)
    rng = np.random.default_rng(0)
    for i in range(n):
        hu = np.where(body, 40, -1000) + rng.normal(0, 20, body.shape)
        image = sitk.GetImageFromArray(hu.astype(np.int16))
        image.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(image, str(root / f"case{i:02d}.nii.gz"))


def test_preprocess_survives_losing_a_node(cluster, tmp_path):
    from pipeline.distributed.ingest import run_preprocess

    n = 24
    _write_inputs(tmp_path / "in", n)
    nodes = _add_nodes(cluster, 2)
    cfg = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), log_to_mlflow=False)
    done_dir = tmp_path / "out" / "private" / "done"
    removed_at: list[int] = []
    finished = threading.Event()

    def remove_when_started() -> None:
        while not finished.is_set():  # the job's own timeout bounds this
            done = len(list(done_dir.glob("*.json"))) if done_dir.is_dir() else 0
            if done >= 3:
                removed_at.append(done)
                _remove(cluster, nodes[-1:], graceful=False)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_when_started, daemon=True)
    watcher.start()
    try:
        manifest = run_preprocess(cfg, progress=False)
    finally:
        finished.set()
        watcher.join(timeout=30)
        _remove(cluster, nodes)
    assert removed_at and removed_at[0] < n, f"the node was not removed mid-job: {removed_at}"
    manifest = manifest_with_sources(tmp_path / "out")  # sources live in OUT/private/, not in the manifest
    sources = manifest[manifest["status"] != "skipped"]["source"].tolist()
    assert sorted(sources) == [f"case{i:02d}.nii.gz" for i in range(n)], "an input is missing or listed twice"
    assert (manifest["status"] == "accepted").all(), manifest[["item_id", "status"]]
    assert len(list(done_dir.glob("*.json"))) == n


# ---------------------------------------------------------------------------------------------------- guide
def test_guide_trains_on_two_nodes(cluster, tmp_path):
    from pipeline.distributed.guide import run_guide
    from pipeline.guide.inference import load_guide

    write_tiny_corpus(tmp_path / "data", n=3)
    nodes = _add_nodes(cluster, 1)
    cfg = load_config(GuideConfig, "guide-tiny", {
        "data": str(tmp_path / "data"), "run_name": "mn-guide", "storage_path": str(tmp_path / "runs"),
        "crop_size_zyx": [16, 16, 16], "n_points": 16, "optim": {"steps": 6, "batch_size": 1, "warmup_steps": 1},
        "checkpoint_every": 3, "log_every": 3, "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    before = set(cluster.global_state.actor_table(None))
    try:
        out = run_guide(cfg)
    finally:
        _remove(cluster, nodes)
    table = cluster.global_state.actor_table(None)
    workers = {a["Address"]["NodeID"] for k, a in table.items()
               if k not in before and "RayTrainWorker" in a.get("ActorClassName", "")}
    assert len(workers) == 2, f"the 2 guide workers did not run on 2 nodes: {workers}"
    assert mlflow.MlflowClient(out["tracking_uri"]).get_run(out["run_id"]).info.status == "FINISHED"
    guide = load_guide(Path(out["checkpoint"]) / "guide.pt")
    assert guide is not None


# ------------------------------------------------------------------------------------------------- pretrain
def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    rows = mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(rows, key=lambda m: (m.timestamp, m.step))]


def test_pretraining_restarts_elastically_on_the_nodes_left(cluster, tmp_path, monkeypatch):
    from pipeline.distributed.pretrain import run_pretrain

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    write_tiny_corpus(tmp_path / "data")
    nodes = _add_nodes(cluster, 1)  # head + 1 = 2 CPUs: 2 workers
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps, every, batch = 150, 5, 1
    cfg = load_config(PretrainConfig, "pretrain-tiny", {
        "data": str(tmp_path / "data"), "run_name": "mn-pretrain", "storage_path": str(tmp_path / "runs"),
        "patches": {"patch_size_zyx": [16, 16, 16]}, "optim": {"steps": steps, "warmup_steps": 1, "batch_size": batch},
        "checkpoint_every": every, "log_every": 1, "registered_model": None, "sample_every": 0,
        "scaling": {"num_workers": [1, 2], "cpus_per_worker": 1}, "max_failures": 3,
        "tracking": {"tracking_uri": uri}})
    client = mlflow.MlflowClient(uri)
    removed_at: list[int] = []
    finished = threading.Event()

    def remove_after_a_checkpoint() -> None:
        while not finished.is_set():
            exp = client.get_experiment_by_name("anatdiff")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            logged = [s for s, _ in _history(uri, runs[0].info.run_id, "loss")] if runs else []
            if logged and max(logged) >= every + 2:
                # Ray Train's controller registers a reported checkpoint when it next polls the workers (every
                # 2 s): a machine lost before that poll loses that checkpoint, so lose it after one poll.
                time.sleep(3.0)
                removed_at.append(max(s for s, _ in _history(uri, runs[0].info.run_id, "loss")))
                _remove(cluster, nodes[-1:], graceful=False)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=remove_after_a_checkpoint, daemon=True)
    watcher.start()
    try:
        out = run_pretrain(cfg)
    finally:
        finished.set()
        watcher.join(timeout=30)
        _remove(cluster, nodes)
    assert removed_at, "the node was never removed (did training start?)"
    run_id = out["run_id"]
    logged = [s for s, _ in _history(uri, run_id, "loss")]
    rewinds = [i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]]
    assert len(rewinds) == 1, f"expected one restart in the logged steps: {logged}"
    resumed_at = logged[rewinds[0]] - 1
    assert resumed_at % every == 0 and 0 < resumed_at < steps, (resumed_at, removed_at, logged)
    assert logged[:rewinds[0]] == list(range(1, logged[rewinds[0] - 1] + 1))  # before: every step once
    assert logged[rewinds[0]:] == list(range(resumed_at + 1, steps + 1))     # after: every step once, to the end
    # samples per step = batch x world size: 2 workers before the loss, the 1 the node left can hold after
    per_step = [v for s, v in _history(uri, run_id, "samples_per_s")]
    rates = [v for s, v in _history(uri, run_id, "steps_per_s")]
    world = [round(a / b / batch) for a, b in zip(per_step, rates)]
    assert world[:rewinds[0]] == [2] * rewinds[0] and set(world[rewinds[0]:]) == {1}, world
    assert client.get_run(run_id).info.status == "FINISHED"
    assert any(k.startswith("system/cpu_utilization") for k in client.get_run(run_id).data.metrics)
