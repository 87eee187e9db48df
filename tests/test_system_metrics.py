"""System metrics (CPU, memory; GPU where NVML finds one) land in every run that ``run_status`` wraps."""

import re
import threading
import time
import tomllib
from pathlib import Path

import pytest

from pipeline import tracking

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating its tables is the slow part)."""
    return tracking.connect(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def _run(uri, name="r"):
    return uri, tracking.start_run(uri, "exp", name)


def _system_keys(uri, run_id):
    return {k for k in tracking.get_run(uri, run_id).data.metrics if k.startswith("system/")}


def test_a_run_logs_cpu_and_memory(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri, run_id = _run(store)
    with tracking.run_status(uri, run_id):
        time.sleep(1.5)
    run = tracking.get_run(uri, run_id)
    assert run.info.status == "FINISHED"
    keys = _system_keys(uri, run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= keys, keys
    memory = tracking.metric_values(uri, run_id, "system/system_memory_usage_megabytes")
    assert len(memory) >= 2 and all(m > 0 for m in memory)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_a_failed_run_stops_its_monitor_and_off_means_off(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri, failing = _run(store, "failing")
    with pytest.raises(RuntimeError, match="boom"), tracking.run_status(uri, failing):
        time.sleep(0.6)
        raise RuntimeError("boom")
    assert tracking.get_run(uri, failing).info.status == "FAILED"
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]
    _, quiet = _run(store, "quiet")
    with tracking.run_status(uri, quiet, system_metrics=False):
        time.sleep(0.6)
    assert not _system_keys(uri, quiet)


def test_resumed_run_continues_the_steps(store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri, run_id = _run(store)
    seen = []
    for _ in range(2):
        monitor = tracking.start_system_metrics(uri, run_id)
        time.sleep(1.2)
        tracking.stop_system_metrics(monitor)
        history = mlflow.MlflowClient(uri).get_metric_history(run_id, "system/cpu_utilization_percentage")
        seen.append(sorted(m.step for m in history))
    first, both = seen
    assert first and len(both) > len(first) and len(set(both)) == len(both)  # new steps, none written twice
    assert min(set(both) - set(first)) > max(first)  # the second monitor went on after the first one's steps


def test_gpu_image_pins_nvidia_ml_py_as_pyproject_does():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pin = next(r for r in extra if r.startswith("nvidia-ml-py=="))
    assert pin in (REPO / "infra" / "docker" / "Dockerfile").read_text()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    psutil = next(d for d in deps if d.startswith("psutil=="))
    assert re.search(rf"^{re.escape(psutil)}$", (REPO / "requirements.lock").read_text(), re.M)
