"""Input roots on a local disk or in object storage (``s3://``, ``gs://``) through ``pyarrow.fs``.

SimpleITK reads local files only, so an object-store item is downloaded to a local temporary folder inside
the worker that processes it, and deleted afterwards. Discovery of an object-store root runs on a *shadow
tree*: the listing replayed locally as empty placeholder files, plus the few small files discovery reads
(``dataset.json``, ``.mhd`` headers, ``patients.csv``). Discovery never opens DICOM or image files.

S3 endpoint and credentials: the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or query parameters of the URI understood by
``pyarrow.fs.FileSystem.from_uri`` (``s3://bucket/prefix?endpoint_override=http://host:9000&region=..``).

GCS endpoint and credentials: Google's default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
application-default login``, or the metadata server on GCP), or URI query parameters
(``gs://anonymous@bucket/prefix?scheme=http&endpoint_override=host:4443``). ``STORAGE_EMULATOR_HOST``, the
variable Google's own clients honour for an emulator (``http://127.0.0.1:9023``, or a bare ``host:port`` read as
http), points every ``gs://`` / ``gcs://`` input without its own ``endpoint_override`` at that emulator,
anonymously. It is read wherever a root is opened, so Ray workers need it in their environment too.
gs:// URIs get ``retry_limit_seconds=30`` unless they set it: without credentials pyarrow's client would
otherwise retry for 15 minutes; the job then stops with one line naming the missing credentials.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

from pipeline.config import UserError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
GCS_SCHEMES = ("gs://", "gcs://")
#: Google's convention for a Cloud Storage emulator's address (``http://host:port``); see the module docstring
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
#: seconds pyarrow's GCS client keeps retrying before it gives up (its own default is 15 minutes, so a machine
#: without Google credentials looked hung); a URI's own ``retry_limit_seconds`` wins
GCS_RETRY_LIMIT_S = 30
#: file names discovery reads (downloaded into the shadow tree); everything else becomes a placeholder
_DISCOVERY_READS = ("dataset.json", "patients.csv")
_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    """One input file: POSIX path relative to the root, size in bytes, modification time in ns (0 unknown)."""

    rel: str
    size: int
    mtime_ns: int


def is_remote(uri: str | Path) -> bool:
    """True for an object-store URI (s3://, gs://, gcs://)."""
    return str(uri).lower().startswith(REMOTE_SCHEMES)


def open_root(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a local folder or an object-store URI. Raises UserError."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    target = _with_gcs_retry_limit(_with_gcs_emulator(str(uri)))
    try:
        fs, root = pafs.FileSystem.from_uri(target)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI or missing support
        raise UserError(f"input '{_public(uri)}': cannot open this object-store URI ({e}); use "
                        "s3://bucket/prefix or gs://bucket/prefix with credentials in the environment") from None
    return fs, root.rstrip("/")


def _with_gcs_emulator(uri: str) -> str:
    """``uri`` rewritten to reach the emulator named by ``STORAGE_EMULATOR_HOST`` anonymously, when that is set
    and ``uri`` is a gs:// / gcs:// URI without its own ``endpoint_override``; else ``uri`` unchanged.
    Other query parameters (``location``, ``retry_limit_seconds``) are kept. Raises UserError on a bad value."""
    host = os.environ.get(GCS_EMULATOR_ENV, "").strip().rstrip("/")
    if not host or not uri.lower().startswith(GCS_SCHEMES):
        return uri
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "endpoint_override" for key, _ in query):
        return uri  # the URI's own endpoint wins over the environment
    scheme, sep, hostport = host.partition("://")
    if not sep:  # Google's clients also accept a bare host:port
        scheme, hostport = "http", host
    if scheme.lower() not in ("http", "https") or not hostport or "/" in hostport or "@" in hostport:
        raise UserError(f"{GCS_EMULATOR_ENV}={host!r}: expected http://host:port (or https://, or host:port)")
    query = [(k, v) for k, v in query if k != "scheme"] + [("scheme", scheme.lower()),
                                                          ("endpoint_override", hostport)]
    netloc = "anonymous@" + parts.netloc.rsplit("@", 1)[-1]  # an emulator takes no credentials
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe=":"), ""))


def _with_gcs_retry_limit(uri: str) -> str:
    """A gs:// / gcs:// ``uri`` with ``retry_limit_seconds=GCS_RETRY_LIMIT_S`` unless it sets its own."""
    if not uri.lower().startswith(GCS_SCHEMES):
        return uri
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "retry_limit_seconds" for key, _ in query):
        return uri
    query.append(("retry_limit_seconds", str(GCS_RETRY_LIMIT_S)))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, safe=":"), ""))


def _cannot_list(uri: str | Path, err: Exception) -> UserError:
    hint = ""
    if str(uri).lower().startswith(GCS_SCHEMES) and "OAuth2" in str(err):
        hint = (" - no Google credentials: set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth "
                f"application-default login`, or point {GCS_EMULATOR_ENV} at an emulator")
    return UserError(f"input '{_public(uri)}': cannot list it ({' '.join(str(err).split())[:300]}){hint}")


def _public(uri: str | Path) -> str:
    """The URI without its query string or user info (which may carry credentials)."""
    text = str(uri).split("?", 1)[0]
    scheme, sep, rest = text.partition("://")
    return f"{scheme}{sep}{rest.split('@', 1)[-1]}" if sep else text


def list_files(uri: str | Path) -> list[FileEntry]:
    """Every regular file under the root, sorted by relative path. Raises UserError when the root is missing."""
    fs, root = open_root(uri)
    try:
        info = fs.get_file_info(root)
    except OSError as e:
        raise _cannot_list(uri, e) from None
    if info.type != pafs.FileType.Directory and not (is_remote(uri) and info.type == pafs.FileType.NotFound):
        what = "is a file, not a folder" if info.type == pafs.FileType.File else "does not exist"
        raise UserError(f"input folder '{_public(uri)}' {what}: pass a folder of CT images (--input)")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise _cannot_list(uri, e) from None
    out = [FileEntry(i.path[len(root):].lstrip("/"), int(i.size or 0), int(i.mtime_ns or 0))
           for i in infos if i.type == pafs.FileType.File]
    if not out and is_remote(uri):
        raise UserError(f"input '{_public(uri)}' holds no file (check the bucket and prefix)")
    return sorted(out, key=lambda e: e.rel)


def download(uri: str | Path, rels: list[str] | tuple[str, ...], dst: str | Path) -> Path:
    """Copy the files ``rels`` (relative to the root ``uri``) to ``dst/<rel>`` byte for byte; return ``dst``.

    ``compression=None``: pyarrow's default ('detect') would gunzip a ``.nii.gz`` (any ``.gz``, ``.bz2``,
    ``.zst``, ..) on the way, leaving a different file than the listing's size and content under the same name."""
    fs, root = open_root(uri)
    dst = Path(dst)
    for rel in rels:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{rel}", compression=None) as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK_BYTES):
                out.write(chunk)
    return dst


def shadow_tree(uri: str | Path, entries: list[FileEntry], dst: str | Path) -> Path:
    """Replay a listing under ``dst``: empty placeholders, except the small files discovery reads
    (``dataset.json``, ``patients.csv``, ``*.mhd`` headers), which are downloaded."""
    dst = Path(dst)
    reads = [e.rel for e in entries if Path(e.rel).name in _DISCOVERY_READS or e.rel.lower().endswith(".mhd")]
    for e in entries:
        (dst / e.rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / e.rel).touch()
    download(uri, reads, dst)
    return dst


def remove_tree(path: str | Path) -> None:
    """Delete a temporary local folder (no error if already gone)."""
    shutil.rmtree(path, ignore_errors=True)
