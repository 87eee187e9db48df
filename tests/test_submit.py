"""`anatdiff submit` against a real Ray head (`ray start --head` on 127.0.0.1, token auth as Ray sets it up),
and the tracking helpers against a real `mlflow server` on 127.0.0.1. Pure parts first (no processes).

Cleanup never uses `ray stop` (it stops every Ray on the machine): the head runs with `--block` in its own
process group, which is terminated by id, and any leftover process naming our temp dir is ended by pid.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.config import UserError
from pipeline.distributed import submit as sub

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ pure parts
def test_entrypoint_is_a_python_module_command_with_quoted_overrides():
    cmd = sub.build_entrypoint("pretrain", "jobs/configs/pretrain-gpu.yaml", ["data=/d ct", "optim.steps=5"])
    assert cmd == ("python -m jobs.pretrain --config jobs/configs/pretrain-gpu.yaml "
                   "--set 'data=/d ct' --set optim.steps=5")
    assert sub.build_entrypoint("pretrain", "jobs/configs/pretrain-gpu.yaml", [], image="img:1") == \
        "python -m jobs.pretrain --config pretrain-gpu"
    with pytest.raises(UserError, match="image"):
        sub.build_entrypoint("pretrain", ".anatdiff-submit/my.yaml", [], image="img:1")


def test_runtime_env_uploads_repo_without_venv_and_pins_lock_without_ray():
    env = sub.build_runtime_env(REPO, "lock", {"MLFLOW_TRACKING_URI": "http://x"})
    assert env["working_dir"] == str(REPO)
    for pattern in (".venv/", ".git/", "/runs/", "/mlflow.db", "/mlartifacts/", "__pycache__/", "*.egg-info/"):
        assert pattern in env["excludes"]
    pkgs = env["pip"]["packages"]
    assert "torch==2.13.0" in pkgs and "mlflow==3.17.2" in pkgs
    assert not any(p.startswith("ray") and "==" in p for p in pkgs)  # the cluster's own Ray is used
    assert "pip" not in sub.build_runtime_env(REPO, "none", {})
    assert sub.build_runtime_env(REPO, "lock", {"A": "1"}, image="img:1") == {"image_uri": "img:1",
                                                                            "env_vars": {"A": "1"}}


def test_tracking_uri_relative_sqlite_refused_for_remote_cluster_made_absolute_for_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for env in ({}, {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}):
        with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
            sub.tracking_env("http://10.0.0.5:8265", env)
    env, warning = sub.tracking_env("http://127.0.0.1:8265", {})
    assert env == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"} and warning is None
    env, warning = sub.tracking_env("http://ray-head:8265", {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"} and warning is None
    assert "shared" in sub.tracking_env("http://ray-head:8265", {"MLFLOW_TRACKING_URI": "sqlite:////nfs/m.db"})[1]
    assert sub.is_local_address("http://localhost:8265") and sub.is_local_address("http://127.0.0.2:1")
    assert not sub.is_local_address("https://ray.example.org")


def test_env_copies_storage_settings_and_named_keys_only():
    environ = {"AWS_DEFAULT_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s", "MY_TOKEN": "t"}
    assert sub.collect_env([], environ) == {"AWS_DEFAULT_REGION": "eu-west-1"}  # secrets need --env
    assert sub.collect_env(["MY_TOKEN"], environ)["MY_TOKEN"] == "t"
    with pytest.raises(UserError, match="NOT_SET"):
        sub.collect_env(["NOT_SET"], environ)
    with pytest.raises(UserError, match="NAME"):
        sub.collect_env(["A=b"], environ)


def test_config_outside_repo_is_staged_inside_the_upload(tmp_path):
    assert sub.locate_config("pretrain-gpu", REPO)[0] == "jobs/configs/pretrain-gpu.yaml"
    assert sub.locate_config(str(REPO / "jobs/configs/demo.yaml"), REPO)[0] == "jobs/configs/demo.yaml"
    with pytest.raises(UserError, match="presets: .*pretrain-tiny"):
        sub.locate_config("no-such-preset", REPO)
    work = tmp_path / "repo"
    (work / "jobs").mkdir(parents=True)
    (work / "jobs" / "synth.py").write_text("")
    (work / ".venv" / "lib").mkdir(parents=True)
    (work / "runs").mkdir()
    (work / "mlflow.db").write_text("")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("n: 2\n")
    rel, file = sub.locate_config(str(cfg), work)
    assert rel == ".anatdiff-submit/mine.yaml" and file == cfg.resolve()
    staged = sub.stage_working_dir(work, file, tmp_path / "stage")
    assert (staged / rel).read_text() == "n: 2\n" and (staged / "jobs" / "synth.py").is_file()
    assert not (staged / ".venv").exists() and not (staged / "runs").exists() and not (staged / "mlflow.db").exists()


def test_bad_config_fails_locally_before_any_upload(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("out: /x\nn: 0\n")
    with pytest.raises(UserError, match="field 'n'"):
        sub.validate_locally("synth", cfg, [])
    with pytest.raises(UserError, match="key=value"):
        sub.validate_locally("synth", None, ["oops"])


def test_unreachable_ray_address_is_a_user_error_fast():
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="unreachable"):
        sub.connect(f"http://127.0.0.1:{free_port()}", timeout_s=5)
    with pytest.raises(UserError, match="http"):
        sub.connect("127.0.0.1:8265")
    assert time.perf_counter() - t0 < 10


def test_cli_exits_2_with_one_line_for_unknown_job_and_missing_config(capsys):
    from jobs.submit import main

    assert main(["nosuchjob", "--address", "http://127.0.0.1:1"]) == 2
    assert main(["synth", "--address", "http://127.0.0.1:1", "--config", "/no/such.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown job 'nosuchjob'" in err[0] and "/no/such.yaml" in err[1]


def test_unreachable_tracking_uri_fails_fast_with_user_error():
    from pipeline import tracking

    t0 = time.perf_counter()
    with pytest.raises(UserError, match="unreachable"):
        tracking.connect(f"http://127.0.0.1:{free_port()}", timeout_s=5)
    assert time.perf_counter() - t0 < 15


# ------------------------------------------------------------------------------------ real processes
def _end_group(proc: subprocess.Popen, marker: str, whole_group: bool, grace_s: float = 10.0) -> None:
    """SIGTERM our leader (it stops its children) or its whole group, then SIGKILL what is left of the group
    and any process whose command line names ``marker`` (only processes this test started carry it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM) if whole_group else proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path, headers=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = Path(f"/tmp/adsub-{os.getpid()}")  # short: Ray's socket paths must stay under 107 chars
    log = tmp_path_factory.mktemp("head") / "head.log"
    dash = free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=4",
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(url + "/api/version", 120, proc, log, headers=sub.ray_auth_headers())
        yield url
    finally:
        _end_group(proc, str(temp_dir), whole_group=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_submit_synth_follow_succeeds_and_writes_files_never_printing_secrets(ray_head, tmp_path, capsys,
                                                                           monkeypatch):
    from jobs.submit import main

    monkeypatch.setenv("ANATDIFF_TEST_SECRET", "s3cr3t-do-not-print")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "corpus"
    t0 = time.perf_counter()
    rc = main(["synth", "--address", ray_head, "--requirements", "none", "--follow", "--env",
               "ANATDIFF_TEST_SECRET", "--set", f"out={out}", "--set", "n=2", "--set", "spacing_mm=8",
               "--set", "workers=1"])
    elapsed = time.perf_counter() - t0
    text = capsys.readouterr().out
    assert rc == 0, text
    assert re.search(r"submitted job raysubmit_\w+", text) and "SUCCEEDED" in text
    assert "ANATDIFF_TEST_SECRET" in text and "MLFLOW_TRACKING_URI" in text
    assert "s3cr3t-do-not-print" not in text
    assert len(list(out.rglob("*.nii.gz"))) == 2, sorted(out.rglob("*"))
    print(f"synth submit + follow: {elapsed:.1f} s")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_submit_external_config_runs_and_failed_job_exits_1(ray_head, tmp_path, capsys, monkeypatch):
    from jobs.submit import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tmp_path / "my-synth.yaml"  # outside the repository: travels in a staged copy of the upload
    cfg.write_text(f"out: {blocker / 'cannot-be-a-folder'}\nn: 1\nspacing_mm: 8\nworkers: 1\n")
    rc = main(["synth", "--address", ray_head, "--requirements", "none", "--follow", "--config", str(cfg)])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "--config .anatdiff-submit/my-synth.yaml" in text and "FAILED" in text
    assert "cannot-be-a-folder" in text  # the job read our file and failed on its own (NotADirectoryError)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_plain_ray_job_submit_runs_a_job_module(ray_head, tmp_path):
    """What docs/running-on-a-cluster.md tells users without anatdiff installed locally."""
    out = tmp_path / "plain"
    env = dict(os.environ, RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
           "python", "-m", "jobs.synth", "--set", f"out={out}", "--set", "n=1", "--set", "spacing_mm=8",
           "--set", "workers=1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert len(list(out.rglob("*.nii.gz"))) == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submitted_chain_preprocess_pretrain_evaluate_logs_dice(ray_head, tmp_path, monkeypatch):
    """The tiny chain as three kinds of cluster jobs; the Dice is read back from MLflow."""
    import mlflow

    from pipeline.config import SynthConfig
    from pipeline.synth.corpus import synthesize_corpus

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, n, seed, labels in (("unlabeled", 3, 0, False), ("labeled", 4, 1000, True)):
        synthesize_corpus(SynthConfig(out=str(tmp_path / name), n=n, seed=seed, labels=labels, spacing_mm=6.0,
                                      workers=1))

    def run(job: str, config: str | None, sets: list[str]) -> str:
        client, job_id = sub.submit(ray_head, job, config, sets, REPO, requirements="none", echo=lambda s: None)
        status = sub.follow(client, job_id, lambda s: None, timeout_s=500)
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-3000:]
        return logs

    for name in ("unlabeled", "labeled"):
        run("preprocess", None, [f"input={tmp_path / name}", f"output={tmp_path / 'pp' / name}",
                                 "target_spacing_zyx_mm=[6,6,6]"])
    logs = run("pretrain", "pretrain-tiny", [f"data={tmp_path / 'pp' / 'unlabeled'}", "optim.steps=4",
                                             "log_every=2", "checkpoint_every=4", f"storage_path={tmp_path / 'runs'}",
                                             "patches.patch_size_zyx=[16,16,16]", "optim.warmup_steps=1"])
    run_id = re.search(r"pretrain run (\w+) finished", logs).group(1)
    run("evaluate", "evaluate-tiny", [f"data={tmp_path / 'pp' / 'labeled'}", f"pretrain_run_id={run_id}",
                                      "head.steps=5", "head.windows_per_volume=2", "ceiling=null",
                                      "patch_size_zyx=[16,16,16]", "compare_random_init=false"])
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("anatdiff").experiment_id],
                              filter_string=f"tags.`anatdiff.pretrain_run_id` = '{run_id}'")
    assert runs, "no evaluate run tagged with the pretrain run id"
    dice = runs[0].data.metrics["dice_mean"]
    assert 0.0 <= dice <= 1.0


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = tmp_path / "mlflow.log"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=tmp_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 90, proc, log)
        yield f"http://127.0.0.1:{port}", tmp_path / "artifacts"
    finally:
        _end_group(proc, str(tmp_path / "server.db"), whole_group=True, grace_s=3.0)


@pytest.mark.timeout(300)
def test_tracking_helpers_against_a_real_mlflow_server(mlflow_server, tmp_path):
    import mlflow

    from pipeline import tracking

    url, artifacts = mlflow_server
    assert tracking.connect(url) == url
    run_id = tracking.start_run(url, "anatdiff-server-test", "smoke", tags={"anatdiff.kind": "test"})
    tracking.log_params(url, run_id, {"optim": {"steps": 3}})
    tracking.log_metrics(url, run_id, {"loss": 0.25}, step=3)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracking.log_artifact(url, run_id, note, "notes")
    tracking.end_run(url, run_id)
    run = mlflow.MlflowClient(url).get_run(run_id)  # a fresh client: what the server stored
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.25}
    assert run.data.params == {"optim.steps": "3"} and run.data.tags["anatdiff.kind"] == "test"
    stored = list(artifacts.rglob("note.txt"))  # proxied upload landed in --artifacts-destination
    assert len(stored) == 1 and stored[0].read_text() == "hello"
