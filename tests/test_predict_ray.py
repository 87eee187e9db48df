"""`anatdiff predict` on Ray: the actor pool reads s3:// inputs (a moto server on 127.0.0.1) and holds the
oracle model; a REAL SIGKILL of the job's process group mid-run, then a rerun that redoes only the rest.

The oracle loader (tests/predict_helpers.py) reaches the actors by import: the kill test puts tests/ on
PYTHONPATH, which the job's Ray workers inherit; in-process, the module is pickled by value.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.config import PredictConfig
import predict_helpers
from predict_helpers import OBLIQUE_FLIPPED, load_oracle, phantom_on_grid, write_btcv, write_oracle
from test_ingest_kill_resume import _kill_all, _session_processes, _stat_key, _wait_gone
from test_ingest_ray import upload_tree

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


def _cases(n: int) -> list[tuple[sitk.Image, sitk.Image]]:
    """n small phantoms (6 mm, on a flipped oblique 4 x 4 x 5 mm grid): about a second each to predict."""
    return [phantom_on_grid(10 + i, (4.0, 4.0, 5.0), OBLIQUE_FLIPPED, phantom_spacing_mm=6.0) for i in range(n)]


def _scans_and_model(tmp: Path, n: int) -> tuple[Path, Path]:
    """An unlabelled folder of n scans (``scans/scan_<i>.nii.gz``) and an oracle model folder knowing them."""
    labelled = write_btcv(tmp / "labelled", _cases(n))
    scans = tmp / "scans"
    scans.mkdir()
    for i, image in enumerate(sorted((labelled / "img").iterdir())):
        shutil.copyfile(image, scans / f"scan_{i}.nii.gz")
    return scans, write_oracle(labelled, tmp / "model", (4.0, 4.0, 4.0))


def _check_geometry(scans: Path, out: Path, table: pd.DataFrame) -> None:
    for row in table[table.status == "predicted"].itertuples():
        source, pred = (sitk.ReadImage(str(p)) for p in (scans / row.source, out / row.label_path))
        assert source.GetSize() == pred.GetSize()
        for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(source, getter)(), getattr(pred, getter)(), atol=1e-4)


@pytest.fixture(scope="module")
def s3_and_ray():
    import ray
    from moto.server import ThreadedMotoServer

    from pipeline.distributed.runtime import init_ray

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                      # before Ray starts, so that its workers inherit them
    init_ray(2)
    ray.cloudpickle.register_pickle_by_value(predict_helpers)   # tests/ is not on the workers' path
    yield f"http://{host}:{port}"
    ray.cloudpickle.unregister_pickle_by_value(predict_helpers)
    ray.shutdown()
    server.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_actor_pool_predicts_s3_inputs_and_accounts_for_every_file(tmp_path, s3_and_ray):
    import pyarrow.fs as pafs

    from pipeline.distributed.predict import map_in_process, run_predict

    scans, model = _scans_and_model(tmp_path, 2)
    (scans / "flat.nii.gz").write_bytes(b"not a nifti at all")
    (scans / "notes.txt").write_text("export notes")
    fs = pafs.S3FileSystem(endpoint_override=s3_and_ray, region="us-east-1", allow_bucket_creation=True)
    upload_tree(fs, scans, "ct-bucket", "new/2025")
    query = f"?endpoint_override={s3_and_ray}&region=us-east-1"
    before = set(Path(tempfile.gettempdir()).glob("anatdiff-*"))
    cfg = PredictConfig(model=str(model), input=f"s3://ct-bucket/new/2025{query}", output=str(tmp_path / "out"),
                        num_cpus=2)
    report = run_predict(cfg, progress=False, segmenter_factory=load_oracle)
    assert report["counts"] == {"predicted": 2, "rejected": 1, "skipped": 1}, report
    assert report["files"] == {"input": 4, "missing": [], "duplicated": []}
    assert report["input"] == "s3://ct-bucket/new/2025"                    # no endpoint or credentials
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table.set_index("source").loc["flat.nii.gz", "reason"].startswith("unreadable:")
    _check_geometry(scans, tmp_path / "out", table)
    assert set(Path(tempfile.gettempdir()).glob("anatdiff-*")) == before   # downloads deleted

    # one object-store FILE as the input (discovery of a single remote scan; predicted in this process)
    one = PredictConfig(model=str(model), input=f"s3://ct-bucket/new/2025/scan_1.nii.gz{query}",
                        output=str(tmp_path / "one"), num_cpus=2, overlays=False)
    single = run_predict(one, progress=False, segmenter_factory=load_oracle, map_units=map_in_process)
    assert single["counts"] == {"predicted": 1, "rejected": 0, "skipped": 0}
    row = pd.read_csv(tmp_path / "one" / "predictions.csv").iloc[0]
    assert row.source == "scan_1.nii.gz" and row.item_id == table.set_index("source").loc["scan_1.nii.gz", "item_id"]


N_SCANS = 6
JOB = """import sys
import predict_helpers
from pipeline.predict import segmenter
segmenter.load_from_folder = predict_helpers.load_oracle   # the oracle as the job's default loader
from jobs.predict import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)  # measured only on a shared machine under load (~7 runnable processes per core):
# 11-15 min there, the actors taking ~5 min to start; the waits below leave room for that
def test_sigkilled_predict_job_resumes_on_rerun(tmp_path):
    scans, model = _scans_and_model(tmp_path, N_SCANS)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="apk-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])})
    cmd = [sys.executable, "-c", JOB, "--model", str(model), "--input", str(scans), "--output", str(out),
           "--set", "num_cpus=2"]
    markers = lambda: sorted(p for p in (out / "private" / "done").glob("*.json") if not p.name.startswith("."))  # noqa: E731
    started: list[subprocess.Popen] = []
    try:
        with open(tmp_path / "first.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(proc)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not markers():
            time.sleep(0.02)
        first_log = (tmp_path / "first.log").read_text(errors="replace")[-3000:]
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before the kill\n{first_log}"
        assert markers(), f"no done marker within 400 s\n{first_log}"
        os.killpg(proc.pid, signal.SIGKILL)                  # the driver, its raylet, GCS and actors at once
        proc.wait(timeout=30)
        assert not _wait_gone(proc.pid, ray_tmp, 60), "processes of the killed job survived"
        done_before = markers()
        assert 1 <= len(done_before) < N_SCANS and not (out / "predictions.csv").exists()
        before = {}
        for marker in done_before:
            before[marker] = _stat_key(marker)
            for row in json.loads(marker.read_text())["rows"]:
                assert row["status"] == "predicted"
                for rel in (row["label_path"], row["overlay_path"]):
                    before[out / rel] = _stat_key(out / rel)

        with open(tmp_path / "rerun.log", "wb") as log:
            rerun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        started.append(rerun)
        rc = rerun.wait(timeout=700)
        rerun_log = (tmp_path / "rerun.log").read_text(errors="replace")
        assert rc == 0, rerun_log[-3000:]
        assert f"{N_SCANS} predicted, 0 rejected, 0 skipped" in rerun_log
        assert f"predict: {N_SCANS - len(done_before)}/{N_SCANS - len(done_before)} inputs" in rerun_log
        assert "scan_" not in rerun_log                      # no input name on the terminal
        assert not _wait_gone(rerun.pid, ray_tmp, 60), "the rerun left Ray processes behind"

        report = json.loads((out / "report.json").read_text())
        assert (report["items_reused"], report["items_processed"]) == (len(done_before), N_SCANS - len(done_before))
        table = pd.read_csv(out / "predictions.csv")
        assert sorted(table.source) == [f"scan_{i}.nii.gz" for i in range(N_SCANS)] and table.item_id.is_unique
        assert (table.status == "predicted").all()
        _check_geometry(scans, out, table)
        changed = [p.name for p, key in before.items() if _stat_key(p) != key]
        assert not changed, f"outputs of scans finished before the kill were rewritten: {changed}"
        hidden = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.name.startswith(".")]
        assert not hidden, f"temporary files left after the rerun: {hidden}"
        assert len(pd.read_csv(out / "organ_volumes.csv")) == N_SCANS
    finally:
        for job in started:
            _kill_all(job, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
