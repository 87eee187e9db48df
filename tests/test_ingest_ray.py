"""The preprocess job on Ray: S3 input (a moto server on 127.0.0.1), no PHI in outputs / MLflow / logs,
resume after a killed run, the report files and the MLflow preprocess run."""

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.config import PreprocessConfig
from pipeline.ingest.manifest import read_manifest, summarize
from pipeline.ingest.private import load_id_key
from pipeline.ingest.resume import content_key
from pipeline.ingest.units import run_unit
from pipeline.io.filesystems import list_files
from pipeline.io.layouts import discover_items
from ingest_helpers import manifest_with_sources
from test_ingest_qc import body_zyx, write_slices

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

PHI = {"0010|0010": "DOE^JANE", "0010|0020": "PHI-12345", "0008|0080": "SAINT PHI HOSPITAL",
       "0008|0050": "ACC-PHI-998", "0008|0090": "HOUSE^GREGORY", "0010|0030": "19010203"}
SECRET = "test-secret-0123456789"


def _nifti(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _corpus(root: Path) -> Path:
    """2 NIfTI, a DICOM folder with two series (one with planted PHI) and a note, a 2-D image, a text file."""
    _nifti(root / "nii" / "a.nii.gz", body_zyx())
    _nifti(root / "nii" / "b.nii.gz", body_zyx(12))
    _nifti(root / "nii" / "flat.nii.gz", body_zyx(1)[0])
    write_slices(root / "dcm" / "study", body_zyx(), uid="1.2.3.4.1", prefix="a", tags=PHI)
    write_slices(root / "dcm" / "study", body_zyx(9, 20), uid="1.2.3.4.2", prefix="b",
                 tags={**PHI, "0018|0010": "IOPAMIDOL"})
    (root / "dcm" / "study" / "DICOMDIR").write_bytes(b"\0" * 300)
    (root / "README.txt").write_text("export notes")
    return root


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before Ray starts, so its workers inherit the credentials
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    import ray

    from pipeline.distributed.runtime import init_ray

    init_ray(2)
    yield
    ray.shutdown()


def _upload(endpoint: str, local: Path, bucket: str, prefix: str) -> str:
    import pyarrow.fs as pafs

    upload_tree(pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True),
                local, bucket, prefix)
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&region=us-east-1"


def upload_tree(fs, local: Path, bucket: str, prefix: str) -> None:
    """Create ``bucket`` on the pyarrow filesystem ``fs`` and copy every file under ``local`` to ``prefix``."""
    fs.create_dir(bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            key = f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}"
            with fs.open_output_stream(key, compression=None) as out:  # as is: pyarrow's 'detect' gzips *.gz
                out.write(p.read_bytes())


def check_object_store_run(uri: str, out: Path, public_uri: str) -> None:
    """Preprocess ``_corpus`` uploaded at ``uri`` into ``out`` and check what every object-store input must
    give: the accounting, the accepted items, the volumes, downloads deleted, the URI without secrets."""
    from pipeline.distributed.ingest import run_preprocess

    before = set(Path(tempfile.gettempdir()).glob("anatdiff-*"))
    cfg = PreprocessConfig(input=uri, output=str(out), target_spacing_zyx_mm=(2.0, 2.0, 2.0),
                           log_to_mlflow=False, num_cpus=2)
    old = os.environ.get("ANATDIFF_PHI_SECRET")
    os.environ["ANATDIFF_PHI_SECRET"] = SECRET  # the corpus' DICOM carries PatientIDs
    try:
        df = run_preprocess(cfg, progress=False)
    finally:
        os.environ.pop("ANATDIFF_PHI_SECRET") if old is None else os.environ.__setitem__("ANATDIFF_PHI_SECRET", old)
    assert summarize(df) == "4 accepted, 1 rejected (2-D image: 1), 2 skipped (not an image file (.txt): 1, not an image file (no DICOM header; no extension): 1)"
    df = manifest_with_sources(out)
    listed = sorted(e.rel for e in list_files(uri))
    assert sorted(f for fs in df["files"] for f in fs) == listed and len(listed) == 24
    acc = df[df.status == "accepted"].set_index("source")
    assert set(acc.index) == {"nii/a.nii.gz", "nii/b.nii.gz", "dcm/study#1.2.3.4.1", "dcm/study#1.2.3.4.2"}
    assert list(acc.loc["dcm/study#1.2.3.4.2", "source_shape"]) == [9, 20, 20]
    assert acc.loc["dcm/study#1.2.3.4.2", "contrast"] and not acc.loc["dcm/study#1.2.3.4.1", "contrast"]
    vol = np.load(out / acc.loc["nii/a.nii.gz", "image_path"])
    assert vol.dtype == np.int16 and 200 < vol.max() <= 300  # the 300 HU core, smoothed at 2 mm
    for row in acc.itertuples():
        assert (out / row.image_path).is_file() and (out / row.mask_path).is_file()
    assert set(Path(tempfile.gettempdir()).glob("anatdiff-*")) == before  # downloads deleted
    report = json.loads((out / "report.json").read_text())
    assert report["files"]["missing"] == 0 and report["files"]["duplicated"] == 0
    assert report["input"] == public_uri
    assert report["rejected_by_reason"] == {"2-D image": 1} and report["items_processed"] == 4


def test_s3_input_is_listed_downloaded_processed_and_accounted(tmp_path, s3_endpoint, ray_local):
    uri = _upload(s3_endpoint, _corpus(tmp_path / "local"), "ct-bucket", "export/2024")
    check_object_store_run(uri, tmp_path / "out", "s3://ct-bucket/export/2024")


def test_no_phi_in_outputs_mlflow_or_logs(tmp_path, capfd, ray_local, monkeypatch):
    monkeypatch.setenv("ANATDIFF_PHI_SECRET", SECRET)
    inp = _corpus(tmp_path / "in")
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    (tmp_path / "ml").mkdir()
    from pipeline import tracking
    from pipeline.distributed.ingest import run_preprocess

    cfg = PreprocessConfig(input=str(inp), output=str(tmp_path / "out"), target_spacing_zyx_mm=(2.0, 2.0, 2.0),
                           num_cpus=2, tracking={"tracking_uri": uri, "experiment": "phi-check"})
    df = run_preprocess(cfg, progress=False)
    print(summarize(df))
    expected = hmac.new(SECRET.encode(), b"PHI-12345", hashlib.sha256).hexdigest()
    assert set(df.loc[df.kind == "dicom", "patient_key"]) == {expected}
    captured = capfd.readouterr()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and "private" not in p.parts] + \
            [p for p in (tmp_path / "ml").rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files if "ml" in p.parts)  # plots reached the artifact store
    blobs = [p.read_bytes() for p in files] + [captured.out.encode(), captured.err.encode()]
    for secret in ("DOE^JANE", "DOE", "PHI-12345", "SAINT PHI HOSPITAL", "ACC-PHI-998", "HOUSE^GREGORY", "19010203"):
        hits = [str(p) for p, b in zip(files + ["stdout", "stderr"], blobs) if secret.encode() in b]
        assert not hits, f"{secret!r} found in {hits}"
    # the MLflow run: counts as metrics, the summary, the per-scanner table and plots as artifacts
    run = tracking.get_run(uri, _only_run_id(tmp_path / "ml" / "mlflow.db"))
    assert run.info.status == "FINISHED" and run.data.metrics["n_accepted"] == 4.0
    assert run.data.metrics["rejected.2-d_image"] == 1.0 and run.data.tags["summary"] == summarize(df)
    arts = {p.as_posix().split("/artifacts/", 1)[1] for p in (tmp_path / "ml" / "mlartifacts").rglob("*")
            if p.is_file()}
    assert {"report/scanners.csv", "report/report.json", "plots/body_hu.png", "plots/spacing.png"} <= arts
    table = (tmp_path / "out" / "scanners.csv").read_text().splitlines()
    assert table[0].startswith("scanner_key,items,accepted,rejected") and any("ACME|Scan 64|B30f" in t for t in table)


def _only_run_id(db: Path) -> str:
    with sqlite3.connect(db) as con:
        (run_id,) = con.execute("select run_uuid from runs").fetchone()
    return run_id


def test_killed_run_resumes_without_duplicates_or_partial_files(tmp_path, ray_local):
    """A run killed after 2 of 4 items (their done markers written), in the middle of a third (a half-written
    temporary volume, and a stale volume without marker): the rerun processes only the 2 unfinished items and
    ends complete; a third run processes nothing."""
    inp = tmp_path / "in"
    for i in range(4):
        _nifti(inp / f"ct{i}.nii.gz", body_zyx(10 + i))
    cfg = PreprocessConfig(input=str(inp), output=str(tmp_path / "out"), target_spacing_zyx_mm=(2.0, 2.0, 2.0),
                           log_to_mlflow=False, num_cpus=2)
    out = tmp_path / "out"
    items, _ = discover_items(inp, load_id_key(out))  # the job's ids: keyed by out/private/id_key
    listing = {e.rel: e for e in list_files(inp)}
    for item in items[:2]:
        run_unit(item, cfg, out, content_key(item.files, listing, cfg))
    (out / "volumes" / f".{items[2].item_id}.npy.tmp-4242").write_bytes(b"\x93NUMPY half")
    np.save(out / "volumes" / f"{items[3].item_id}.npy", np.zeros((2, 2, 2), np.int16))  # no marker: redone
    first_marker = (out / "private" / "done" / f"{items[0].item_id}.json").stat().st_mtime_ns

    from pipeline.distributed.ingest import run_preprocess

    df = run_preprocess(cfg, progress=False)
    report = json.loads((out / "report.json").read_text())
    assert (report["items_reused"], report["items_processed"]) == (2, 2)
    assert summarize(df) == "4 accepted, 0 rejected, 0 skipped" and df.item_id.is_unique
    assert not list(out.rglob("*.tmp-*"))
    assert (out / "private" / "done" / f"{items[0].item_id}.json").stat().st_mtime_ns == first_marker
    for row in df.itertuples():
        assert np.load(out / row.image_path).shape == tuple(row.shape)
    assert np.load(out / f"volumes/{items[3].item_id}.npy").shape != (2, 2, 2)  # the stale file was replaced
    df2 = run_preprocess(cfg, progress=False)
    assert json.loads((out / "report.json").read_text())["items_processed"] == 0
    assert df2.equals(read_manifest(out)) and len(df2) == 4 and summarize(df2) == summarize(df)
    # an input that changes is processed again
    _nifti(inp / "ct0.nii.gz", body_zyx(14))
    run_preprocess(cfg, progress=False)
    assert json.loads((out / "report.json").read_text())["items_processed"] == 1
    assert list(manifest_with_sources(out).set_index("source").loc["ct0.nii.gz", "source_shape"])[0] == 14
