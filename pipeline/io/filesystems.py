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

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
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
    """One input file: POSIX path relative to the root, size in bytes, modification time in ns (0 unknown).
    ``skip``: why the entry is listed but is no readable regular file (a broken or looping symbolic link, a
    fifo, a folder that cannot be listed); None for a regular file."""

    rel: str
    size: int
    mtime_ns: int
    skip: str | None = None


def _special_reason(mode: int) -> str:
    kind = ("fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
            "device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "special file")
    return f"not a regular file ({kind}; never opened)"


def _link_target(path: str, root_real: str) -> tuple[str, str | None]:
    """('dir' | 'file' | 'skip', reason) of a symbolic link; links to folders inside the root are not
    followed (the folder is read where it lies)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return "skip", ("symbolic link loop" if e.errno == errno.ELOOP else
                        "broken symbolic link (its target does not exist)" if e.errno == errno.ENOENT else
                        f"unreadable symbolic link ({e.strerror})")
    if stat.S_ISDIR(st.st_mode):
        real = os.path.realpath(path)
        if real == root_real or real.startswith(root_real + os.sep):
            return "skip", "symbolic link to a folder inside the input (read there, not twice)"
        return "dir", None
    if stat.S_ISREG(st.st_mode):
        return "file", None
    return "skip", _special_reason(st.st_mode)


def _entry_kind(e: os.DirEntry, root_real: str, visited: set) -> tuple[str, str | None]:
    """('dir' | 'file' | 'skip', reason) of one folder entry; a folder is walked once (``visited``: the
    (device, inode) of every folder scheduled so far), a second way to it is reported."""
    if e.is_symlink():
        kind, reason = _link_target(e.path, root_real)
    else:
        mode = e.stat(follow_symlinks=False).st_mode
        kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "skip"
        reason = _special_reason(mode) if kind == "skip" else None
    if kind != "dir":
        return kind, reason
    if not os.access(e.path, os.R_OK | os.X_OK):
        return "skip", "folder that cannot be listed (permission denied)"
    st = os.stat(e.path)
    if (st.st_dev, st.st_ino) in visited:
        return "skip", "symbolic link to a folder already read (a loop, or a second link to it)"
    visited.add((st.st_dev, st.st_ino))
    return "dir", None


def walk_local(root: str | Path) -> Iterator[tuple[Path, list[str], list[str], list[tuple[str, str]]]]:
    """``os.walk`` of a local folder, top-down with sorted names: (folder, subfolders, regular files,
    [(name, reason)] of entries that are neither). Symbolic links to files are files; links to folders
    outside ``root`` are walked once; links into ``root``, link loops, broken links, fifos, sockets and
    devices are reported, never followed or opened. A folder that cannot be listed is reported in its parent.
    """
    root_real = os.path.realpath(root)
    st = os.stat(root)
    visited: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        dirs, files, special = [], [], []
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            kind, reason = _entry_kind(e, root_real, visited)
            if kind == "skip":
                special.append((e.name, reason))
            else:
                (dirs if kind == "dir" else files).append(e.name)
        yield folder, dirs, files, special
        stack.extend(folder / d for d in reversed(dirs))


def is_remote(uri: str | Path) -> bool:
    """True for an object-store URI (s3://, gs://, gcs://)."""
    return str(uri).lower().startswith(REMOTE_SCHEMES)


def prepare_output(output: str, input_path: str) -> Path:
    """The local output folder of a job that reads ``input_path``, created and returned as an absolute path.

    Raises UserError for an object-store URI (every Ray worker writes the output: it must be a local or
    shared, mounted folder), for a folder that is, or lies inside, a local input folder (a rerun would read
    its own output), and when it cannot be created."""
    if is_remote(output):
        raise UserError(f"output '{output}' is an object-store URI: the output must be a local or shared "
                        "(mounted) folder that every Ray worker can write")
    out = Path(os.path.abspath(output))
    if not is_remote(input_path) and os.path.isdir(input_path):
        inp = Path(os.path.abspath(input_path))
        if out == inp or inp in out.parents:
            raise UserError(f"output folder '{output}' is inside the input folder '{input_path}': "
                            "choose an output folder outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder '{output}': {e.strerror}") from None
    return out


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


def _list_local(root: str) -> list[FileEntry]:
    """``walk_local`` as FileEntry rows: regular files with size and mtime, other entries with their ``skip``."""
    out = []
    for folder, _, files, special in walk_local(root):
        rel_dir = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in files:
            st = os.stat(folder / name)
            out.append(FileEntry(prefix + name, int(st.st_size), int(st.st_mtime_ns)))
        for name, reason in special:
            st = os.lstat(folder / name)
            out.append(FileEntry(prefix + name, 0, int(st.st_mtime_ns), reason))
    return out


def list_files(uri: str | Path) -> list[FileEntry]:
    """Every file under the root, sorted by relative path: regular files, and (local roots) the entries
    ``walk_local`` reports with a ``skip`` reason. Raises UserError when the root is missing."""
    if not is_remote(uri):
        root = os.path.abspath(uri)
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
            raise UserError(f"input folder '{uri}' {what}: pass a folder of CT images (--input)")
        if not os.access(root, os.R_OK | os.X_OK):
            raise UserError(f"input folder '{uri}' cannot be listed (permission denied)")
        return sorted(_list_local(root), key=lambda e: e.rel)
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
    entries = [e for e in entries if e.skip is None]
    reads = [e.rel for e in entries if Path(e.rel).name in _DISCOVERY_READS or e.rel.lower().endswith(".mhd")]
    for e in entries:
        (dst / e.rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / e.rel).touch()
    download(uri, reads, dst)
    return dst


def remove_tree(path: str | Path) -> None:
    """Delete a temporary local folder (no error if already gone)."""
    shutil.rmtree(path, ignore_errors=True)
