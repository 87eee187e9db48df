"""The preprocess job on a ``gs://`` input: a GCS emulator (gcp-storage-emulator, served from this process) on
127.0.0.1, reached through ``STORAGE_EMULATOR_HOST`` by the driver and the Ray workers. Mirrors the S3 test in
test_ingest_ray.py (same corpus, same assertions). The emulator is a declared test dependency: without it these
tests fail, they never skip."""

import gzip
import logging
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.config import UserError
from pipeline.io.filesystems import GCS_EMULATOR_ENV, _with_gcs_emulator, download, list_files
from test_ingest_ray import _corpus, check_object_store_run, upload_tree

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
    upload_tree(pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http",
                                   project_id="anatdiff-test"), local, bucket, prefix)
    return f"gs://{bucket}/{prefix}"


@pytest.mark.ray
def test_gcs_input_is_listed_downloaded_processed_and_accounted(tmp_path, gcs_endpoint, ray_local):
    uri = _upload(gcs_endpoint, _corpus(tmp_path / "local"), "ct-bucket", "export/2024")
    check_object_store_run(uri, tmp_path / "out", "gs://ct-bucket/export/2024")


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


def test_gcs_uris_get_a_retry_limit_unless_they_set_one():
    from pipeline.io.filesystems import GCS_RETRY_LIMIT_S, _with_gcs_retry_limit

    assert _with_gcs_retry_limit("gs://b/p") == f"gs://b/p?retry_limit_seconds={GCS_RETRY_LIMIT_S}"
    assert _with_gcs_retry_limit("gs://b/p?retry_limit_seconds=3") == "gs://b/p?retry_limit_seconds=3"
    assert _with_gcs_retry_limit("s3://b/p") == "s3://b/p"


@pytest.mark.timeout(90)
def test_gcs_without_credentials_fails_with_one_clear_line(monkeypatch):
    """No emulator, no Google credentials: a UserError within the retry limit, never a hang or a traceback."""
    monkeypatch.delenv(GCS_EMULATOR_ENV, raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(UserError, match="cannot (list|open)"):
        list_files("gs://anatdiff-no-such-bucket/prefix?retry_limit_seconds=2")
