"""A REAL killed preprocess run, then a rerun (test_ingest_ray only simulates the kill).

`python -m jobs.preprocess` runs as a subprocess in its own session (so its embedded local Ray instance,
started by that process, is in the same session and process group); as soon as the first items have their
done markers the whole group gets SIGKILL. The rerun must reuse exactly the items finished before the kill,
redo the others, and end with a complete manifest, no duplicates and no temporary files.

Each job gets its own RAY_TMPDIR and no RAY_ADDRESS: Ray then finds no ``ray_current_cluster`` file and no
address to join, so every run starts a fresh local instance (never the killed one's leftovers, never a Ray
that another test or a `ray start` left running), and the job's Ray processes are found by that folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SynthConfig
from ingest_helpers import manifest_with_sources
from pipeline.synth.corpus import synthesize_corpus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 10


def _session_processes(sid: int, marker: str) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid``, or whose command line holds ``marker``: pid -> cmd."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if fields[0] == "Z":
            continue
        if int(fields[3]) == sid or marker in cmd:
            found[int(proc.name)] = cmd or stat[stat.index("(") + 1:stat.rindex(")")]
    return found


def _wait_gone(sid: int, marker: str, seconds: float) -> dict[int, str]:
    deadline = time.time() + seconds
    while (alive := _session_processes(sid, marker)) and time.time() < deadline:
        time.sleep(0.2)
    return alive


def _kill_all(job: subprocess.Popen, marker: str) -> None:
    """SIGKILL what is left of a job we started: its process group while its leader lives, then any
    straggler of its session (or holding ``marker``, the job's RAY_TMPDIR) by pid."""
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    for pid in _session_processes(job.pid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _markers(out: Path) -> list[Path]:
    return sorted(p for p in (out / "private" / "done").glob("*.json") if not p.name.startswith("."))


def _temporary_files(out: Path) -> list[str]:
    """Hidden files (``.<name>.tmp-<pid>``, the temporary names of save_npy_atomic / write_done) in OUT."""
    return [f"{d}/{e.name}" for d in ("volumes", "masks", "labels", "private/done") if (out / d).is_dir()
            for e in os.scandir(out / d) if e.name.startswith(".")]


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_sigkilled_preprocess_job_resumes_on_rerun(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    # 10 phantoms at 4 mm (~0.3 s each to preprocess to 3 mm): the job runs ~3 s after its first marker
    synthesize_corpus(SynthConfig(out=str(inp), n=N_ITEMS, seed=3, spacing_mm=4.0, workers=1))
    images = sorted(inp.glob("*.nii.gz"))
    assert len(images) == N_ITEMS
    input_files = sorted(p.relative_to(inp).as_posix() for p in inp.rglob("*") if p.is_file())
    metas = [f for f in input_files if f.startswith("meta/")]  # the phantoms' json sidecars: skipped rows
    assert len(metas) == N_ITEMS and len(input_files) == 2 * N_ITEMS

    ray_tmp = tempfile.mkdtemp(prefix="akr-", dir="/tmp")  # short: Ray's unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({"RAY_TMPDIR": ray_tmp, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "jobs.preprocess", "--input", str(inp), "--output", str(out),
           "--set", "log_to_mlflow=false", "--set", "num_cpus=2"]
    started: list[subprocess.Popen] = []
    try:
        # --- the first run, killed while it is half-way -----------------------------------------------------
        with open(tmp_path / "first.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(proc)
        deadline, seen = time.time() + 120, 0
        while time.time() < deadline and proc.poll() is None:
            seen = len(_markers(out))
            if seen >= 1:
                break
            time.sleep(0.02)
        first_log = lambda: (tmp_path / "first.log").read_text(errors="replace")[-3000:]  # noqa: E731
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before it could be killed "
                        f"({seen} of {N_ITEMS} markers seen): make the corpus bigger\n{first_log()}")
        assert seen >= 1, f"no done marker within 120 s\n{first_log()}"
        assert seen < N_ITEMS, "every item was done before the kill: make the corpus bigger"
        # best effort, for up to 2 s and while half the items are left: kill while an array is half-written
        # (a temporary file exists), so that the rerun also meets a real partial file
        until = time.time() + 2
        while time.time() < until and len(_markers(out)) < N_ITEMS // 2 and not _temporary_files(out):
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its raylet, GCS and Ray workers at once
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, \
            f"the job ended by itself (rc {proc.returncode}) before the kill: make the corpus bigger\n{first_log()}"
        survivors = _wait_gone(proc.pid, ray_tmp, 15)
        assert not survivors, f"processes of the killed job survived SIGKILL of its group: {survivors}"

        # a real partial state: some items finished, no manifest or report yet
        done_before = _markers(out)
        assert 1 <= len(done_before) < N_ITEMS, \
            f"{len(done_before)} of {N_ITEMS} markers after the kill: not a partial run\n{first_log()}"
        assert not (out / "manifest.parquet").exists() and not (out / "report.json").exists(), \
            "the killed job had already written its manifest: it finished before the kill"
        leftovers_at_kill = _temporary_files(out)
        before = {}  # every file a finished item owns: its marker and its arrays, with inode and mtime
        for marker in done_before:
            before[marker] = _stat_key(marker)
            for row in json.loads(marker.read_text())["rows"]:
                assert row["status"] == "accepted", row
                for col in ("image_path", "mask_path", "label_path"):
                    if row.get(col):
                        before[out / row[col]] = _stat_key(out / row[col])
        assert len(before) >= 3 * len(done_before)  # marker + volume + mask each

        # --- the rerun, to completion ---------------------------------------------------------------------
        with open(tmp_path / "rerun.log", "wb") as log:
            rerun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        started.append(rerun)
        try:
            rc = rerun.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("the rerun did not finish within 180 s")
        rerun_log = (tmp_path / "rerun.log").read_text(errors="replace")
        assert rc == 0, rerun_log[-3000:]
        assert f"{N_ITEMS} accepted, 0 rejected, {N_ITEMS} skipped" in rerun_log
        assert not _wait_gone(rerun.pid, ray_tmp, 15), "the rerun left Ray processes behind"
        sessions = [p for p in (Path(ray_tmp) / "ray").glob("session_*") if not p.is_symlink()]
        assert len(sessions) == 2, f"the rerun did not start its own Ray instance: {sessions}"

        # --- the result -----------------------------------------------------------------------------------
        report = json.loads((out / "report.json").read_text())
        assert report["items"] == N_ITEMS
        assert (report["items_reused"], report["items_processed"]) == \
            (len(done_before), N_ITEMS - len(done_before)), "finished items were redone, or unfinished reused"
        assert report["files"]["missing"] == report["files"]["duplicated"] == report["files"]["unknown"] == 0

        df = manifest_with_sources(out)
        items = df[df.status != "skipped"]
        assert len(items) == N_ITEMS and items.item_id.is_unique, items.item_id.tolist()
        assert (items.status == "accepted").all(), items[["item_id", "status", "reason"]].to_string()
        assert sorted(df.loc[df.status == "skipped", "source"]) == metas  # skipped rows: not duplicated
        listed = Counter(f for fs in df["files"] for f in fs)
        assert sorted(listed) == input_files and set(listed.values()) == {1}, listed
        assert sorted(f for fs in items["files"] for f in fs) == [p.relative_to(inp).as_posix() for p in images]
        for row in items.itertuples():
            volume, mask = np.load(out / row.image_path), np.load(out / row.mask_path)
            assert volume.shape == mask.shape == tuple(row.shape) and volume.dtype == np.int16
            assert mask.any()
            assert (out / "private" / "done" / f"{row.item_id}.json").is_file()
        assert len(_markers(out)) == N_ITEMS
        assert sorted(p.name for p in (out / "volumes").iterdir()) == sorted(Path(p).name for p in items.image_path)
        hidden = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
        assert not hidden, f"temporary files left after the rerun: {hidden} (at the kill: {leftovers_at_kill})"

        # items finished before the kill were not redone: same files, untouched
        changed = [p.relative_to(out).as_posix() for p, key in before.items() if _stat_key(p) != key]
        assert not changed, f"files of items finished before the kill were rewritten: {changed}"
        reused = {m.stem for m in done_before}
        keys = {m.stem: json.loads(m.read_text())["content_key"] for m in done_before}
        for row in items[items.item_id.isin(reused)].itertuples():
            assert row.content_key == keys[row.item_id]
    finally:
        for job in started:  # only if a check failed midway: never leak the jobs' processes
            _kill_all(job, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
