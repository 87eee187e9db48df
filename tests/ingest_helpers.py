"""Test helpers for preprocess outputs: the public manifest joined with its private id -> path mapping."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from pipeline.ingest.manifest import read_manifest


def manifest_with_sources(out: Path) -> pd.DataFrame:
    """``read_manifest(out)`` with ``source`` and ``files`` filled from ``out/private/sources.csv`` (the
    columns the public manifest leaves empty unless ``readable_ids``)."""
    df = read_manifest(out)
    source, files = {}, {}
    with open(Path(out) / "private" / "sources.csv", newline="") as f:
        for rec in csv.DictReader(f):
            source[rec["item_id"]] = rec["source"]
            files.setdefault(rec["item_id"], []).append((int(rec["file_number"]), rec["file"]))
    df["source"] = [source.get(i) for i in df["item_id"]]
    df["files"] = [[f for _, f in sorted(files.get(i, []))] for i in df["item_id"]]
    return df
