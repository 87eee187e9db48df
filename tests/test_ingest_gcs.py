"""The preprocess job on a ``gs://`` input: a GCS emulator (gcp-storage-emulator, served from this process) on
127.0.0.1, reached through ``STORAGE_EMULATOR_HOST`` by the driver and the Ray workers. Mirrors the S3 test in
test_ingest_ray.py (same corpus, same assertions). The emulator is a declared test dependency: without it these
tests fail, they never skip."""

import gzip
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline.config import PreprocessConfig, UserError
from pipeline.ingest.manifest import summarize
from pipeline.io.filesystems import GCS_EMULATOR_ENV, _with_gcs_emulator, download, list_files
from test_ingest_ray import _corpus

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def gcs_endpoint():
    """``host:port`` of an in-memory GCS emulator; STORAGE_EMULATOR_HOST points at it for the module."""
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError as e:
        pytest.fail(f"gcp-storage-emulator is a test dependency (pyproject's test extra, requirements.lock): {e}")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # one line per request otherwise
    server = create_server("127.0.0.1", 0, in_memory=True)  # port 0: the OS picks a free one
    server.start()
    old = os.environ.get(GCS_EMULATOR_ENV)
    try:
        port = server._api._httpd.server_port  # the pinned version's HTTPServer; bound once start() returns
        os.environ[GCS_EMULATOR_ENV] = f"http://127.0.0.1:{port}"  # before Ray starts: its workers inherit it
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()
        os.environ.pop(GCS_EMULATOR_ENV) if old is None else os.environ.__setitem__(GCS_EMULATOR_ENV, old)


@pytest.fixture(scope="module")
def ray_local(gcs_endpoint):
    import ray

    from pipeline.distributed.runtime import init_ray

    init_ray(2)
    yield
    ray.shutdown()


def _upload(endpoint: str, local: Path, bucket: str, prefix: str) -> str:
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http", project_id="anatdiff-test")
    fs.create_dir(bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            key = f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}"
            with fs.open_output_stream(key, compression=None) as out:  # as is: pyarrow's 'detect' gzips *.gz
                out.write(p.read_bytes())
    return f"gs://{bucket}/{prefix}"


@pytest.mark.ray
def test_gcs_input_is_listed_downloaded_processed_and_accounted(tmp_path, gcs_endpoint, ray_local):
    uri = _upload(gcs_endpoint, _corpus(tmp_path / "local"), "ct-bucket", "export/2024")
    before = set(Path(tempfile.gettempdir()).glob("anatdiff-*"))
    cfg = PreprocessConfig(input=uri, output=str(tmp_path / "out"), target_spacing_zyx_mm=(2.0, 2.0, 2.0),
                           log_to_mlflow=False, num_cpus=2)
    from pipeline.distributed.ingest import run_preprocess

    df = run_preprocess(cfg, progress=False)
    assert summarize(df) == "4 accepted, 1 rejected (2-D image: 1), 2 skipped"
    listed = sorted(e.rel for e in list_files(uri))
    assert sorted(f for fs in df["files"] for f in fs) == listed and len(listed) == 24
    acc = df[df.status == "accepted"].set_index("source")
    assert set(acc.index) == {"nii/a.nii.gz", "nii/b.nii.gz", "dcm/study#1.2.3.4.1", "dcm/study#1.2.3.4.2"}
    assert list(acc.loc["dcm/study#1.2.3.4.2", "source_shape"]) == [9, 20, 20]
    assert acc.loc["dcm/study#1.2.3.4.2", "contrast"] and not acc.loc["dcm/study#1.2.3.4.1", "contrast"]
    vol = np.load(tmp_path / "out" / acc.loc["nii/a.nii.gz", "image_path"])
    assert vol.dtype == np.int16 and 200 < vol.max() <= 300  # the 300 HU core, smoothed at 2 mm
    for row in acc.itertuples():
        assert (tmp_path / "out" / row.image_path).is_file() and (tmp_path / "out" / row.mask_path).is_file()
    assert set(Path(tempfile.gettempdir()).glob("anatdiff-*")) == before  # downloads deleted
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["files"]["missing"] == [] and report["files"]["duplicated"] == [] and report["input"] == \
        "gs://ct-bucket/export/2024"
    assert report["rejected_by_reason"] == {"2-D image": 1} and report["items_processed"] == 4


def test_gcs_endpoint_in_the_uri_byte_exact_download_and_missing_prefix(tmp_path, gcs_endpoint):
    """Without the environment variable, the URI alone reaches the emulator (anonymous@, scheme, endpoint);
    a .nii.gz comes down byte for byte (not gunzipped on the way); a prefix with no object is a clear error."""
    gz = gzip.compress(b"not really NIfTI " * 64)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "x.nii.gz").write_bytes(gz)
    (tmp_path / "in" / "y.txt").write_text("y")
    _upload(gcs_endpoint, tmp_path / "in", "uri-bucket", "p")
    host = os.environ.pop(GCS_EMULATOR_ENV)
    try:
        uri = f"gs://anonymous@uri-bucket/p?scheme=http&endpoint_override={gcs_endpoint}"
        assert [(e.rel, e.size) for e in list_files(uri)] == [("sub/x.nii.gz", len(gz)), ("y.txt", 1)]
    finally:
        os.environ[GCS_EMULATOR_ENV] = host
    assert [e.rel for e in list_files("gcs://uri-bucket/p/sub")] == ["x.nii.gz"]
    download("gs://uri-bucket/p", ["sub/x.nii.gz", "y.txt"], tmp_path / "dl")
    assert (tmp_path / "dl" / "sub" / "x.nii.gz").read_bytes() == gz and (tmp_path / "dl" / "y.txt").read_text() == "y"
    with pytest.raises(UserError, match="holds no file"):
        list_files("gs://uri-bucket/nothing-here")


def test_storage_emulator_host_rewrites_only_gcs_uris(monkeypatch):
    monkeypatch.setenv(GCS_EMULATOR_ENV, "http://127.0.0.1:9023/")
    assert _with_gcs_emulator("gs://b/p") == "gs://anonymous@b/p?scheme=http&endpoint_override=127.0.0.1:9023"
    assert _with_gcs_emulator("gcs://b/p?retry_limit_seconds=3&scheme=https") == \
        "gcs://anonymous@b/p?retry_limit_seconds=3&scheme=http&endpoint_override=127.0.0.1:9023"
    own = "gs://b/p?endpoint_override=other:1&scheme=http"
    assert _with_gcs_emulator(own) == own  # the URI's own endpoint wins
    assert _with_gcs_emulator("s3://b/p") == "s3://b/p"
    monkeypatch.setenv(GCS_EMULATOR_ENV, "localhost:4443")  # a bare host:port, as Google's clients accept
    assert _with_gcs_emulator("gs://b") == "gs://anonymous@b?scheme=http&endpoint_override=localhost:4443"
    monkeypatch.setenv(GCS_EMULATOR_ENV, "ftp://h:1")
    with pytest.raises(UserError, match="STORAGE_EMULATOR_HOST"):
        _with_gcs_emulator("gs://b/p")
    monkeypatch.delenv(GCS_EMULATOR_ENV)
    assert _with_gcs_emulator("gs://b/p") == "gs://b/p"
