"""``OUT/private/``: the only place of a preprocess output folder that holds input paths.

Everything else in the output folder (manifest, reports, plots, array names), every MLflow key and value and
every log line carries item ids only (``pipeline.io.layouts.make_item_id``). The private folder (mode 0700)
holds:

- ``id_key``: the random key of this output folder's item ids (0600; made on the first run, kept by reruns so
  that ids and resume markers stay stable);
- ``sources.csv``: item_id, status, source, file_number, file: one line per input file, so "file 5 of 20" in
  a reason is line ``file_number = 5`` of its item;
- ``accounting.json``: the input files missing from, or listed twice in, the manifest (paths);
- ``done/<item_id>.json``: resume markers (``pipeline.ingest.resume``), full rows with their paths.

Share the output folder without ``private/``; keep ``private/`` where the source data may be read.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import secrets
from pathlib import Path

from pipeline.io.atomic import write_atomic

PRIVATE_DIR = "private"
ID_KEY_FILE = "id_key"
SOURCES_FILE = "sources.csv"
ACCOUNTING_FILE = "accounting.json"


def private_dir(out_dir: str | Path) -> Path:
    """``out_dir/private`` (created, mode 0700)."""
    path = Path(out_dir) / PRIVATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only (0600), through a temporary name and a rename."""
    def write(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)

    write_atomic(path, write)


def load_id_key(out_dir: str | Path) -> bytes:
    """The item-id key of ``out_dir`` (32 random bytes, made on first use and kept in ``private/id_key``)."""
    path = private_dir(out_dir) / ID_KEY_FILE
    if not path.is_file():
        write_private_text(path, secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


def skipped_id(rel_path: str, key: bytes) -> str:
    """The id of a skipped input file's row (``file-`` + 16 hex of HMAC-SHA256(key, path))."""
    return "file-" + hmac.new(key, rel_path.encode(), hashlib.sha256).hexdigest()[:16]


def sources_csv(rows: list[dict]) -> str:
    """``sources.csv`` text: item_id, status, source, file_number (1-based, as in reasons), file."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["item_id", "status", "source", "file_number", "file"])
    for r in sorted(rows, key=lambda r: (r.get("item_id") or "", r.get("source") or "")):
        for n, f in enumerate(r.get("files") or [], start=1):
            writer.writerow([r.get("item_id") or "", r["status"], r.get("source") or "", n, f])
    return out.getvalue()


def write_private_records(rows: list[dict], accounting: dict, out_dir: str | Path) -> list[Path]:
    """Write ``private/sources.csv`` (the id -> input mapping of ``rows``) and ``private/accounting.json``
    (``accounting``: path lists); returns their paths."""
    folder = private_dir(out_dir)
    paths = [folder / SOURCES_FILE, folder / ACCOUNTING_FILE]
    write_private_text(paths[0], sources_csv(rows))
    write_private_text(paths[1], json.dumps(accounting, indent=2) + "\n")
    return paths
