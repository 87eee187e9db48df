"""The preprocess manifest: one row per item (accepted / rejected) or skipped input file.

Schema in ``MANIFEST_SCHEMA``; columns are documented in docs/dataset-formats.md. Paths are relative to the
folder holding ``manifest.parquet``. Rows are built with every column plus ``INTERNAL_COLUMNS`` (kept in the
private done markers); ``write_manifest`` publishes them without the internal columns and, unless the user
opted in to readable names, without ``source`` and ``files`` (the input paths: they go to
``OUT/private/sources.csv``, ``pipeline.ingest.private``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import UserError
from pipeline.io.atomic import write_atomic

MANIFEST_NAME = "manifest.parquet"

_str, _f3, _i3 = pa.string(), pa.list_(pa.float64()), pa.list_(pa.int64())
MANIFEST_SCHEMA = pa.schema([
    ("item_id", _str), ("source", _str), ("files", pa.list_(pa.string())), ("kind", _str),
    ("status", _str), ("reason", _str),
    ("spacing_mm", _f3), ("source_shape", _i3), ("target_spacing_mm", _f3), ("shape", _i3),
    ("origin_xyz_mm", _f3), ("image_path", _str), ("label_path", _str), ("mask_path", _str),
    ("has_label", pa.bool_()), ("modality", _str), ("scanner_key", _str), ("patient_key", _str),
    ("slice_thickness_mm", pa.float64()), ("kvp", pa.float64()), ("contrast", pa.bool_()),
    ("hu_hist_body", _i3), ("content_key", _str), ("volume_digest", _str),
])
COLUMNS = tuple(MANIFEST_SCHEMA.names)
#: row fields that never reach the public manifest: the DICOM SeriesInstanceUID and a fingerprint of the
#: series' slices (to find copies of one series in several folders), and whether a patient identifier was
#: read but could not be keyed (no secret set)
INTERNAL_COLUMNS = ("series_uid", "slices_key", "unkeyed_patient")
#: columns holding input paths: published only with ``readable_ids``
PATH_COLUMNS = ("source", "files")
STATUSES = ("accepted", "rejected", "skipped")


ROW_FIELDS = COLUMNS + INTERNAL_COLUMNS


def empty_row(**values) -> dict:
    """A row: every column and internal field None (``has_label`` False, ``files`` []), then ``values``."""
    unknown = set(values) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown manifest columns {sorted(unknown)}; allowed: {ROW_FIELDS}")
    return {**{c: None for c in ROW_FIELDS}, "files": [], "has_label": False, **values}


def public_row(row: dict, readable: bool = False) -> dict:
    """``row`` as published: no internal columns; ``source`` None and ``files`` [] unless ``readable``."""
    out = {c: row.get(c) for c in COLUMNS}
    if not readable:
        out.update(source=None, files=[])
    return out


def skipped_row(rel_path: str, reason: str) -> dict:
    """The row of an input file that is not an image (status 'skipped')."""
    return empty_row(source=rel_path, files=[rel_path], status="skipped", reason=reason)


def write_manifest(rows: list[dict], out_dir: str | Path, readable: bool = False) -> Path:
    """Write ``out_dir/manifest.parquet`` atomically (temporary file, then rename), sorted by status, item_id,
    source; rows as ``public_row(row, readable)``. Raises ValueError for an unknown column or status."""
    rows = [empty_row(**r) for r in rows]
    bad = {r["status"] for r in rows} - set(STATUSES)
    if bad:
        raise ValueError(f"manifest status must be one of {STATUSES}, got {sorted(bad)}")
    rows.sort(key=lambda r: (STATUSES.index(r["status"]), r["item_id"] or "", r["source"] or ""))
    table = pa.Table.from_pylist([public_row(r, readable) for r in rows], schema=MANIFEST_SCHEMA)
    return write_atomic(Path(out_dir) / MANIFEST_NAME, lambda tmp: pq.write_table(table, tmp))


def read_manifest(out_dir: str | Path) -> pd.DataFrame:
    """The manifest of a preprocessed folder as a DataFrame (list columns as numpy arrays)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in '{out_dir}': run `anatdiff preprocess` first")
    return pd.read_parquet(path)


def reason_class(reason: str | None) -> str:
    """The part of a reason before its first ':' ("not CT: modality MR" -> "not CT")."""
    return (reason or "").split(":", 1)[0].strip()


def summarize(manifest: pd.DataFrame) -> str:
    """One line: ``N accepted, M rejected (reason: n, ...), K skipped (reason: n, ...)``."""
    status = Counter(manifest["status"])

    def detail(which: str) -> str:
        reasons = Counter(reason_class(r) for r in manifest.loc[manifest["status"] == which, "reason"])
        return f" ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))})" if reasons else ""

    return (f"{status['accepted']} accepted, {status['rejected']} rejected{detail('rejected')}, "
            f"{status['skipped']} skipped{detail('skipped')}")
