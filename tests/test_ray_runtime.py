"""``init_ray`` beside a real ``ray start --head`` on this machine: without RAY_ADDRESS a job starts its own
local instance and says so in one line; with RAY_ADDRESS it runs on that cluster; a stale address file (the
cluster died) is ignored, and RAY_ADDRESS pointing at it is one line, never a traceback. The job's terminal
holds its own lines only (no Ray worker output, no Ray Data plan or progress logs).

The head gets its own temp folder (RAY_TMPDIR, where ``ray_current_cluster`` is written) and free ports, and is
stopped by the PIDs of its processes: never ``ray stop``, which would stop other people's clusters."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(tags: list[str]) -> set[int]:
    """PIDs of processes whose command line holds one of ``tags``, and their descendants (not this one)."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(proc.name)] = (int(fields[1]), cmd)
    found = {pid for pid, (_, cmd) in table.items() if any(t in cmd for t in tags)}
    while True:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _stop(tags: list[str]) -> None:
    """SIGTERM, then SIGKILL, the processes of the head we started (found by its temp folder and address)."""
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _processes(tags):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while _processes(tags) and time.time() < deadline:
            time.sleep(0.2)
    assert not _processes(tags), "the test's Ray head left processes behind"


def _drivers(session: Path) -> int:
    """Driver log files in the head's session folder: one per job that ran on it."""
    return len(list((session / "logs").glob("python-core-driver-*.log")))


def _job(inp: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.preprocess", "--input", str(inp), "--output", str(out),
                           "--set", "log_to_mlflow=false", "--set", "num_cpus=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_jobs_beside_a_running_ray_head(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        vol = np.full((10, 24, 24), -1000, np.int16)
        vol[:, 4:20, 4:20] = 40
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(inp / f"ct{i}.nii.gz"))
    temp = tempfile.mkdtemp(prefix="arh-", dir="/tmp")   # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ANATDIFF_RAY_LOGS")}
    env.update(RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    tags = [temp]
    try:
        subprocess.run([str(RAY), "start", "--head", f"--port={port}", f"--ray-client-server-port={_free_port()}",
                        "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}/ray",
                        "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180, check=True)
        address = Path(temp, "ray", "ray_current_cluster").read_text().strip()
        tags.append(address)
        assert address.endswith(f":{port}")
        head = Path(temp, "ray", "session_latest").resolve()   # the jobs' own instances start sessions beside it

        # 1. no RAY_ADDRESS: a private local instance, said in one line; nothing runs on the head
        before = _drivers(head)
        private = _job(inp, tmp_path / "out1", env)
        assert private.returncode == 0, private.stderr[-3000:]
        assert private.stderr.splitlines() == [
            f"anatdiff: a Ray cluster started with `ray start` runs at {address}; this job starts its own local "
            "Ray instance (to run it on that cluster instead: RAY_ADDRESS=auto)"], private.stderr[-3000:]
        assert private.stdout.splitlines()[0] == "2 accepted, 0 rejected, 0 skipped"
        assert len(private.stdout.splitlines()) == 2      # the summary and the report's path: no Ray lines
        assert _drivers(head) == before

        # 2. RAY_ADDRESS names the head: the job runs there (with this machine's token), quietly
        attached = _job(inp, tmp_path / "out2", {**env, "RAY_ADDRESS": address})
        assert attached.returncode == 0 and attached.stderr == "", attached.stderr[-3000:]
        assert attached.stdout.splitlines()[0] == "2 accepted, 0 rejected, 0 skipped"
        assert _drivers(head) == before + 1

        # 3. the head dies and leaves its address file: ignored without RAY_ADDRESS, one line with it
        _stop(tags)
        stale = _job(inp, tmp_path / "out3", env)
        assert stale.returncode == 0, stale.stderr[-3000:]
        assert stale.stderr.splitlines() == [
            f"anatdiff: ignoring {temp}/ray/ray_current_cluster: the Ray cluster it names ({address}) is gone; "
            "this job starts its own local Ray instance"]
        t0 = time.perf_counter()
        dead = _job(inp, tmp_path / "out4", {**env, "RAY_ADDRESS": "auto"})
        assert dead.returncode == 2 and time.perf_counter() - t0 < 60
        assert dead.stderr.splitlines() == [
            f"anatdiff preprocess: error: no Ray cluster answers at RAY_ADDRESS=auto ({address}): start that "
            "cluster, or unset RAY_ADDRESS to run on a local Ray instance"]
    finally:
        _stop(tags)
        shutil.rmtree(temp, ignore_errors=True)
