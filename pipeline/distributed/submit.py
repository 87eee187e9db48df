"""Submitting a job to a running Ray cluster through its job API (``JobSubmissionClient``).

The job runs as ``python -m jobs.<name> --config <file> [--set k=v ...]`` on the cluster, with this repository
uploaded as the runtime environment's ``working_dir``, our pinned requirements installed by Ray (unless the
cluster image already has them), and ``MLFLOW_TRACKING_URI`` plus the storage settings copied from the local
environment. Only environment variable NAMES are ever printed: values may be credentials.

Authentication: Ray 2.59+ clusters started where a token exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``) require it on every HTTP request, but ``JobSubmissionClient`` only sends it when
``RAY_AUTH_MODE=token`` is set in the submitting process. We read the token with Ray's own loader and pass it
as an explicit ``Authorization: Bearer`` header, so submission works with or without that variable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

from pipeline.config import UserError, load_config, parse_set_overrides
from pipeline.registry import cluster_jobs, find_job
from pipeline.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri

# Never uploaded: environments, VCS data, run outputs, local MLflow stores, caches (gitwildmatch patterns).
# Ray also honours the working dir's .gitignore; these hold when it has none (a copied tree, --working-dir).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv/", "venv/", ".git/", "/runs/", "/anatdiff-demo/", "/mlflow.db", "/mlartifacts/", "/mlruns/",
    "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", "/build/", "/dist/",
)
# Copied to the job when set locally: where outputs go, never credentials (those need an explicit --env).
STORAGE_ENV_VARS: tuple[str, ...] = (
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST",
)
STAGED_DIR = ".anatdiff-submit"


def job_names(working_dir: Path) -> list[str]:
    """Modules of the registry's cluster jobs (pipeline/registry.py) present under ``working_dir/jobs``
    (``python -m jobs.<name>``)."""
    return sorted(j.module for j in cluster_jobs() if (working_dir / "jobs" / f"{j.module}.py").is_file())


def is_local_address(address: str) -> bool:
    """True when the job API address points at this machine (loopback host or ``localhost``)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tracking_env(address: str, environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """``MLFLOW_TRACKING_URI`` for the job, and a warning or None.

    A local SQLite store (the default ``sqlite:///mlflow.db``) is made absolute for a cluster on this
    machine; a remote cluster would write it inside its throw-away working dir, so that is refused.
    """
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    relative_sqlite = not uri or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"))
    if is_local_address(address):
        return {"MLFLOW_TRACKING_URI": resolve_tracking_uri(uri or DEFAULT_TRACKING_URI)}, None
    if relative_sqlite:
        raise UserError(
            f"MLFLOW_TRACKING_URI is {uri or 'unset (default sqlite:///mlflow.db)'}: a job on the remote "
            f"cluster {address} would write that store inside its throw-away working dir. Export "
            "MLFLOW_TRACKING_URI=http(s)://<team MLflow server> (infra/mlflow, docs/running-on-a-cluster.md)")
    warning = None
    if uri.startswith(("sqlite:", "file:", "/")):
        warning = f"MLFLOW_TRACKING_URI {uri} is a local path: every cluster node must see it (shared mount)"
    return {"MLFLOW_TRACKING_URI": uri}, warning


def collect_env(keys: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The storage settings that are set locally, plus every ``--env KEY`` (which must be set)."""
    out = {k: environ[k] for k in STORAGE_ENV_VARS if environ.get(k)}
    for key in keys:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--env expects an environment variable NAME (its value is read locally), got '{key}'")
        if key not in environ:
            raise UserError(f"--env {key}: {key} is not set in this shell; export it first")
        out[key] = environ[key]
    return out


def locate_config(config: str | None, working_dir: Path) -> tuple[str | None, Path | None]:
    """``--config`` as the job will see it: (path relative to ``working_dir``, local file) or (None, None).

    ``config`` is a file (anywhere) or a preset name under ``working_dir/jobs/configs``. A file outside
    ``working_dir`` is given the path ``.anatdiff-submit/<name>`` where ``stage_working_dir`` puts it.
    """
    if config is None:
        return None, None
    presets = working_dir / "jobs" / "configs"
    for cand in (Path(config).expanduser(), working_dir / config, presets / f"{config}.yaml", presets / config):
        if cand.is_file():
            file = cand.resolve()
            break
    else:
        known = ", ".join(sorted(f.stem for f in presets.glob("*.yaml")))
        raise UserError(f"--config '{config}' is neither a file nor a preset in {presets} (presets: {known})")
    try:
        return file.relative_to(working_dir.resolve()).as_posix(), file
    except ValueError:
        return f"{STAGED_DIR}/{file.name}", file


def validate_locally(job: str, config_file: Path | None, sets: list[str]) -> None:
    """Fail before any upload when the config or a ``--set`` is wrong (same checks as the job runs): the
    job's config class comes from the registry (pipeline/registry.py)."""
    overrides = parse_set_overrides(sets)
    config = find_job(job, cluster=True).config
    if config is not None and config_file is not None:
        load_config(config, config_file, overrides)


def stage_working_dir(working_dir: Path, config_file: Path, staging: Path) -> Path:
    """Copy ``working_dir`` (less DEFAULT_EXCLUDES) to ``staging/working_dir`` with the config added under
    ``.anatdiff-submit/``, so a config file from outside the repository travels with the upload."""
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", DEFAULT_EXCLUDES)

    def ignore(dirpath: str, names: list[str]) -> list[str]:
        rel = Path(dirpath).relative_to(working_dir)
        return [n for n in names
                if spec.match_file((rel / n).as_posix() + ("/" if (Path(dirpath) / n).is_dir() else ""))]

    dst = staging / "working_dir"
    shutil.copytree(working_dir, dst, ignore=ignore, symlinks=True)
    (dst / STAGED_DIR).mkdir(exist_ok=True)
    shutil.copy2(config_file, dst / STAGED_DIR / config_file.name)
    return dst


def lock_packages(lock_file: Path) -> list[str]:
    """Pinned requirements for Ray's ``pip`` runtime env, less ``ray`` itself (the cluster's Ray is used)."""
    if not lock_file.is_file():
        raise UserError(f"--requirements lock: {lock_file} not found; use --requirements none when the "
                        "cluster image already has anatdiff's dependencies (infra/docker/Dockerfile)")
    lines = [ln.split("#", 1)[0].strip() for ln in lock_file.read_text().splitlines()]
    return [ln for ln in lines if ln and not re.match(r"ray(\[[^\]]*\])?\s*==", ln)]


def build_runtime_env(working_dir: Path, requirements: str, env_vars: dict[str, str],
                      image: str | None = None) -> dict:
    """Ray runtime environment. ``image``: run in that container (Ray allows only env_vars beside it)."""
    if image:
        return {"image_uri": image, "env_vars": env_vars}
    env = {"working_dir": str(working_dir), "excludes": list(DEFAULT_EXCLUDES), "env_vars": env_vars}
    if requirements == "lock":
        env["pip"] = {"packages": lock_packages(working_dir / "requirements.lock"), "pip_check": False}
    elif requirements != "none":
        raise UserError(f"--requirements must be 'lock' or 'none', got '{requirements}'")
    return env


def build_entrypoint(job: str, config_rel: str | None, sets: list[str], image: str | None = None) -> str:
    """The shell command Ray runs: ``python -m jobs.<job> [--config PATH] [--set k=v ...]``.

    With ``image`` the code and presets come from the image, so the config must be a preset there.
    """
    argv = ["python", "-m", f"jobs.{job}"]
    if config_rel is not None:
        if image:
            if not config_rel.startswith("jobs/configs/"):
                raise UserError(f"--image runs the code and presets baked into {image}; the config "
                                f"'{config_rel}' cannot travel with it (Ray's image_uri allows no working_dir). "
                                "Make it a preset in jobs/configs/ and rebuild the image, or drop --image")
            config_rel = Path(config_rel).stem
        argv += ["--config", config_rel]
    for item in sets:
        argv += ["--set", item]
    return shlex.join(argv)


def ray_auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` from the local Ray token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``, Ray's order), or ``{}`` when there is none. The value is never printed."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return {}
    return {"Authorization": "Bearer " + loader.get_raw_token(ignore_auth_mode=True)}


def connect(address: str, timeout_s: float = 10.0):
    """A ``JobSubmissionClient`` for the job API at ``address`` (the dashboard, ``http://host:8265``).

    Checks the address answers within ``timeout_s`` first (Ray's client has no timeout), and turns an
    unreachable address or a rejected token into a one-line ``UserError``.
    """
    import requests
    from ray.job_submission import JobSubmissionClient

    if not re.match(r"^https?://[^/]+", address):
        raise UserError(f"--address must be the Ray job API URL, http(s)://host:port (the dashboard port, "
                        f"8265 by default), got '{address}'")
    headers = ray_auth_headers()
    try:
        reply = requests.get(address.rstrip("/") + "/api/version", headers=headers, timeout=timeout_s)
    except requests.RequestException as e:
        raise UserError(f"the Ray job API at {address} is unreachable ({type(e).__name__}); start the cluster "
                        "or forward its dashboard port (docs/running-on-a-cluster.md)") from None
    if reply.status_code in (401, 403):
        raise UserError(_auth_message(address, bool(headers)))
    if reply.status_code != 200:
        raise UserError(f"{address}/api/version answered HTTP {reply.status_code}: is this a Ray dashboard?")
    return JobSubmissionClient(address, headers=headers)


def _auth_message(address: str, had_token: bool) -> str:
    what = "rejected this machine's Ray token" if had_token else "needs a token and none was found"
    return (f"the Ray cluster at {address} {what}: copy the cluster's token (`ray get-auth-token` on the head) "
            "to ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")


def submit(address: str, job: str, config: str | None, sets: list[str], working_dir: Path,
           requirements: str = "lock", image: str | None = None, env_keys: list[str] = (),
           environ: Mapping[str, str] = os.environ, echo: Callable[[str], None] = print):
    """Validate locally, then submit ``python -m jobs.<job>`` to ``address``. Returns (client, job id).

    ``echo`` receives a summary that names environment variables but never shows their values.
    """
    working_dir = Path(working_dir).resolve()
    job = {j.command: j.module for j in cluster_jobs()}.get(job, job)  # `train-guide` runs jobs.train_guide
    names = job_names(working_dir)
    if job not in names:
        raise UserError(f"unknown job '{job}'; jobs in {working_dir / 'jobs'}: {', '.join(names) or 'none'}")
    config_rel, config_file = locate_config(config, working_dir)
    validate_locally(job, config_file, sets)
    env_vars, warning = tracking_env(address, environ)
    env_vars.update(collect_env(list(env_keys), environ))
    entrypoint = build_entrypoint(job, config_rel, sets, image)
    client = connect(address)
    if warning:
        echo(f"warning: {warning}")
    with tempfile.TemporaryDirectory(prefix="anatdiff-submit-") as staging:
        upload = working_dir
        if config_file is not None and config_rel.startswith(STAGED_DIR) and not image:
            upload = stage_working_dir(working_dir, config_file, Path(staging))
        runtime_env = build_runtime_env(upload, requirements, env_vars, image)
        echo(f"submitting to {address}: {entrypoint}")
        echo(f"  working_dir: {'(image) ' + image if image else working_dir}; pip: "
             f"{len(runtime_env['pip']['packages']) if 'pip' in runtime_env else 0} pinned packages; "
             f"env vars: {', '.join(sorted(env_vars))}")
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                       metadata={"anatdiff.job": job, "anatdiff.config": config_rel or ""})
        except Exception as e:  # noqa: BLE001 - Ray raises RuntimeError/AuthenticationError with HTTP text
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            if type(e).__name__ == "AuthenticationError":
                raise UserError(_auth_message(address, True)) from None
            raise UserError(f"the Ray cluster at {address} refused the job: {first}") from None
    return client, job_id


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def follow(client, job_id: str, write: Callable[[str], None], poll_s: float = 1.0,
           timeout_s: float | None = None) -> str:
    """Stream the job's logs to ``write`` until it ends; return its final status (SUCCEEDED/FAILED/STOPPED).

    ``timeout_s`` bounds the wait (None: wait as long as the job runs).
    """
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    async def bounded() -> None:
        await asyncio.wait_for(tail(), timeout_s)

    try:
        asyncio.run(bounded())
    except asyncio.TimeoutError:
        raise UserError(f"job {job_id} still running after {timeout_s:.0f} s; it keeps running") from None
    for _ in range(int(60 / poll_s)):  # the log stream closes as the job ends; the status follows shortly
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    return str(client.get_job_status(job_id).value)
