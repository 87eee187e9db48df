"""MLflow access: the only module that imports mlflow.

Runs are created by the driver (before any worker or GPU is taken), metrics are logged by run id from rank 0
of the training loop, artifacts from the driver at the end. A relative ``sqlite:///mlflow.db`` is made absolute
so that Ray workers, whose working directory differs, write to the same store.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.config import UserError

# the job's own progress lines are the terminal's; MLflow's artifact download bars would bury them
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUNS_SCHEME = "runs:/"


def run_id_of(spec: str | None) -> str | None:
    """The run id of a ``runs:/<run_id>[/<artifact path>]`` reference ("" when it names none); None when
    ``spec`` is not one (a file path, ``models:/``, None). The one parser of ``runs:/`` in the project."""
    if not spec or not spec.startswith(RUNS_SCHEME):
        return None
    return spec[len(RUNS_SCHEME):].strip("/").split("/")[0]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` or ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``; relative SQLite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root_for(uri: str) -> str | None:
    """For a SQLite store, keep artifacts beside the database file (not in the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def connect(uri: str | None = None, timeout_s: float = 10.0) -> str:
    """Point mlflow at the store and check it answers; raise UserError quickly if it does not."""
    import mlflow

    # MLflow sets its logger to INFO on import: "Creating initial MLflow database tables..." is not the job's
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = resolve_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "unreachable"
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"MLflow tracking server {uri} is unreachable ({msg}); start it or set "
                        "MLFLOW_TRACKING_URI / tracking.tracking_uri to a reachable store") from None
    return uri


def ensure_experiment(name: str, uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_root_for(uri))


#: values that are URIs of MLflow objects or servers, not of data
_NOT_A_PATH = ("runs:/", "models:/", "http://", "https://", "mlflow-artifacts:")
#: config fields (last part of a flattened param name) and tags whose values are paths or data URIs
PATH_FIELDS = frozenset({"data", "input", "output", "out", "storage_path", "checkpoint", "test_data", "bank_cache",
                         "workdir", "eval_data", "real_data", "guide_checkpoint", "coords_dir", "real_ct",
                         "tracking_uri", "model"})
PATH_TAGS = frozenset({"anatdiff.data", "anatdiff.checkpoint", "anatdiff.run_key", "anatdiff.guide"})


def public_value(value: Any) -> str:
    """``value`` as text, with a local path or a data URI (``s3://``, ``gs://``) replaced by ``path-`` + 12 hex
    of its SHA-256: folder and file names are often a patient's name or accession number, and nothing derived
    from them may reach MLflow. The digest still tells two runs on the same folder apart."""
    import hashlib

    text = str(value)
    if ("/" in text or "\\" in text) and not text.startswith(_NOT_A_PATH):
        return "path-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text


def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
              resume_tag: tuple[str, str] | None = None) -> str:
    """Create a run (or reuse the unfinished one carrying ``resume_tag``) and return its id."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp_id = ensure_experiment(experiment, uri)
    if resume_tag is not None:
        key, value = resume_tag[0], public_value(resume_tag[1])
        found = client.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found and found[0].info.status != "FINISHED":
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    all_tags = {k: public_value(v) if k in PATH_TAGS else str(v) for k, v in (tags or {}).items()}
    if resume_tag is not None:
        all_tags[resume_tag[0]] = public_value(resume_tag[1])
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Flattened params (``a.b = value``; values of ``PATH_FIELDS`` replaced by ``public_value``); params
    already logged are skipped."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(uri)
    existing = client.get_run(run_id).data.params
    items = [Param(k, (public_value(v) if k.rsplit(".", 1)[-1] in PATH_FIELDS else str(v))[:6000])
             for k, v in flatten(params).items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]  # NaN allowed
    if batch:
        mlflow.MlflowClient(uri).log_batch(run_id, metrics=batch)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, public_value(v) if k in PATH_TAGS else str(v))


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.MlflowClient(uri).log_artifact(run_id, str(path), artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient(uri).set_terminated(run_id, status=status)


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dst))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot fetch artifact '{artifact_path}' of MLflow run {run_id} from {uri}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return Path(local)


def get_run(uri: str, run_id: str):
    import mlflow

    try:
        return mlflow.MlflowClient(uri).get_run(run_id)
    except Exception:  # noqa: BLE001
        raise UserError(f"MLflow run '{run_id}' not found in {uri}") from None


def start_system_metrics(uri: str, run_id: str, node_id: str | None = None,
                         interval_s: float | None = None):
    """Start MLflow's system-metrics monitor for ``run_id`` in a thread of this process; returns it (call
    ``stop_system_metrics``), or None when psutil is missing (a warning says so).

    Every ``interval_s`` seconds (default 10; ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins) it logs this
    machine's ``system/cpu_utilization_percentage``, ``system/system_memory_usage_{megabytes,percentage}``,
    disk and network figures and, where ``nvidia-ml-py`` finds GPUs, ``system/gpu_<i>_utilization_percentage``
    and ``system/gpu_<i>_memory_usage_{megabytes,percentage}`` (``system/<node_id>/...`` with a node id).
    A resumed run continues the steps it had.
    """
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines on the console
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:  # psutil missing
        logging.getLogger(__name__).warning("system metrics are off for this run: %s (pip install psutil)", e)
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s or 10.0, resume_logging=True,
                                   node_id=node_id, tracking_uri=uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop a monitor from ``start_system_metrics`` and flush what it sampled (None: nothing to do)."""
    if monitor is not None:
        monitor.finish()


@contextmanager
def run_status(uri: str, run_id: str, system_metrics: bool = True) -> Iterator[None]:
    """Mark the run FINISHED on success, FAILED (or KILLED on Ctrl-C) otherwise. While the block runs,
    ``system_metrics`` logs this machine's CPU, memory (and GPU) use to the run (``start_system_metrics``)."""
    monitor = start_system_metrics(uri, run_id) if system_metrics else None
    try:
        yield
    except KeyboardInterrupt:
        stop_system_metrics(monitor)
        end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        stop_system_metrics(monitor)
        end_run(uri, run_id, "FAILED")
        raise
    stop_system_metrics(monitor)
    end_run(uri, run_id, "FINISHED")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def register_model(uri: str, run_id: str, artifact_path: str, name: str, alias: str) -> int:
    """Register a run's artifact folder as a new version of ``name`` and point ``alias`` at it.

    Our model files are plain PyTorch checkpoints (not an MLflow flavour), so the version is created from the
    artifact URI directly. Load with ``models:/<name>@<alias>`` (``mlflow.artifacts.download_artifacts``).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="anatdiff pretrained 3D backbones (model.pt)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def log_metric_history(uri: str, run_id: str, key: str, values, steps) -> None:
    """One metric's history (``values[i]`` at ``steps[i]``) in batches of 1000 (e.g. a training loss curve)."""
    import mlflow
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(key, float(v), ts, int(s)) for v, s in zip(values, steps)]
    client = mlflow.MlflowClient(uri)
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def start_child_run(uri: str, parent_run_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """A run nested under ``parent_run_id`` (tag ``mlflow.parentRunId``, same experiment); returns its id."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    all_tags = {**dict(tags or {}), "mlflow.parentRunId": parent_run_id}
    return client.create_run(parent.info.experiment_id, run_name=run_name, tags=all_tags).info.run_id


def find_runs(uri: str, filter_string: str, experiment: str | None = None, max_results: int = 1000) -> list:
    """Runs matching an MLflow ``filter_string`` (in ``experiment``, else in every experiment), newest first."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        ids = [] if exp is None else [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    return list(client.search_runs(ids, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                                   max_results=max_results))


def log_artifacts(uri: str, run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
    """Every file under ``directory`` as artifacts of the run (under ``artifact_path``)."""
    import mlflow

    mlflow.MlflowClient(uri).log_artifacts(run_id, str(directory), artifact_path)


def metric_values(uri: str, run_id: str, key: str) -> list[float]:
    """A metric's logged values in step order."""
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def log_torch_model(uri: str, run_id: str, module, name: str, files: list[str], registered_name: str | None,
                    alias: str, signature=None) -> tuple[str, int | None]:
    """Log ``module`` as an ``mlflow.pytorch`` model ``name`` of ``run_id`` (pickled, with the ``pipeline``
    package as code and ``files`` as extra files); register it as ``registered_name`` with ``alias``.

    ``mlflow.pytorch.load_model`` and ``mlflow.pyfunc.load_model`` unpickle it (they run code: load models only
    from stores you trust); anatdiff's own loaders read the plain files instead. Returns (model URI, version).
    """
    import mlflow

    package = Path(__file__).resolve().parent
    mlflow.set_tracking_uri(uri)
    # the pickle caveat is in this docstring and docs/predict.md; MLflow's own lines would bury the job's
    pytorch_log = logging.getLogger("mlflow.pytorch")
    level, pytorch_log.level = pytorch_log.level, logging.ERROR
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(module, name=name, signature=signature, extra_files=files,
                                            code_paths=[str(package)], serialization_format="pickle",
                                            pip_requirements=[])
    finally:
        pytorch_log.setLevel(level)
    if not registered_name:
        return info.model_uri, None
    with contextlib.redirect_stderr(io.StringIO()):  # "Successfully registered model ..." lines
        version = mlflow.register_model(info.model_uri, registered_name)
    mlflow.MlflowClient(uri).set_registered_model_alias(registered_name, alias, version.version)
    return f"models:/{registered_name}@{alias}", int(version.version)


def log_segmenter_model(uri: str, run_id: str, segmenter, folder: str | Path, registered_name: str | None,
                        alias: str) -> tuple[str, int | None]:
    """``log_torch_model`` of a segmenter as ``model``, with a signature ((Z, Y, X) HU in, (Z, Y, X) uint8
    labels out) and the plain segmenter files of ``folder`` (what `anatdiff predict` reads) as extra files."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # unnamed tensors: a named input makes pyfunc pass {name: array}, which the PyTorch flavour refuses
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))
    files = [str(f) for f in sorted(Path(folder).iterdir()) if f.is_file()]
    return log_torch_model(uri, run_id, segmenter, "model", files, registered_name, alias, signature)


def download_model(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """A local copy under ``dst`` of a model folder named by ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>``
    or ``models:/<name>/<version>`` (the registry is the tracking store). Raises UserError when it cannot be
    fetched."""
    import mlflow

    uri = connect(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"cannot fetch model '{model_uri}' from {uri}: {first}") from None
    return Path(local)
