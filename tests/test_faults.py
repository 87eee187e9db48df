"""Fault tolerance of pretraining on a local Ray instance with 2 CPU workers: a killed worker, a killed job,
an unreachable tracking server."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from conftest import write_tiny_corpus
from pipeline.config import PretrainConfig, load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, name: str, steps: int, **extra) -> PretrainConfig:
    return load_config(PretrainConfig, "pretrain-tiny", {
        "data": str(tmp / "data"), "run_name": name, "storage_path": str(tmp / "runs"),
        "patches": {"patch_size_zyx": [16, 16, 16]}, "optim": {"steps": steps, "warmup_steps": 1},
        "checkpoint_every": 5, "log_every": 1, "registered_model": None,
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}, **extra})


def _loss_steps(uri: str, run_id: str) -> list[int]:
    return [m.step for m in sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, "loss"),
                                   key=lambda m: m.timestamp)]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipeline.distributed.runtime import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_fails_before_anything_starts(tmp_path):
    write_tiny_corpus(tmp_path / "data")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--data", str(tmp_path / "data"),
                        "--set", f"storage_path={tmp_path / 'runs'}",
                        "--set", f"tracking.tracking_uri=http://127.0.0.1:{_free_port()}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # Ray Train never started
    assert time.perf_counter() - t0 < 60


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ray::RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _kill_one_worker_when(uri_getter, min_step: int, killed: list) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        run_id = uri_getter()
        if run_id:
            uri, rid = run_id
            steps = _loss_steps(uri, rid)
            if steps and max(steps) >= min_step:
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append((max(steps), pids[-1]))
                    return
        time.sleep(0.2)


def test_killed_worker_restarts_from_checkpoint(tmp_path, ray_session):
    from pipeline.distributed.pretrain import run_pretrain

    write_tiny_corpus(tmp_path / "data")
    cfg = _cfg(tmp_path, "fault-worker", steps=60)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)

    def current_run():
        exp = client.get_experiment_by_name("anatdiff")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return (uri, runs[0].info.run_id) if runs else None

    killed: list = []
    watcher = threading.Thread(target=_kill_one_worker_when, args=(current_run, 12, killed), daemon=True)
    watcher.start()
    out = run_pretrain(cfg)
    watcher.join(timeout=5)
    assert killed, "the test never killed a worker (run finished too fast?)"
    steps = _loss_steps(uri, out["run_id"])
    assert max(steps) == 60 and steps[-1] == 60
    rewinds = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert rewinds, f"no restart is visible in the logged steps: {steps}"
    resumed_at = steps[rewinds[0]] - 1  # the checkpoint the new worker group restored
    assert resumed_at > 0 and resumed_at % 5 == 0, f"restart did not resume from a checkpoint: {steps}"
    assert steps.count(1) == 1, "the run restarted from step zero"
    assert client.get_run(out["run_id"]).info.status == "FINISHED"


def test_killed_job_resumes_from_storage_on_rerun(tmp_path, ray_session):
    from pipeline.distributed.pretrain import run_pretrain

    write_tiny_corpus(tmp_path / "data")
    cfg = _cfg(tmp_path, "fault-job", steps=40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "jobs.pretrain", "--data", cfg.data, "--run-name", cfg.run_name,
            "--steps", str(cfg.optim.steps), "--set", f"storage_path={cfg.storage_path}",
            "--set", "patches.patch_size_zyx=[16,16,16]", "--set", "optim.warmup_steps=1",
            "--set", "checkpoint_every=5", "--set", "log_every=1", "--set", "registered_model=null",
            "--set", f"tracking.tracking_uri={uri}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = Path(cfg.storage_path) / cfg.run_name
    deadline = time.time() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
    while time.time() < deadline and not snapshot.exists():
        time.sleep(0.3)
    assert snapshot.exists(), "no checkpoint was registered before the kill"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C or a job stop does
    proc.wait(timeout=120)
    first = _loss_steps(uri, mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("anatdiff").experiment_id])[0].info.run_id)
    assert first and max(first) < 40, "the first job finished before it was killed"

    out = run_pretrain(cfg)  # same run name and storage: resumes
    steps = _loss_steps(uri, out["run_id"])
    assert max(steps) == 40
    assert steps.count(1) == 1, f"step 1 logged twice: the rerun started from zero ({steps})"
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("anatdiff").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run continued
