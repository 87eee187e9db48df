"""The work of one discovered item inside a worker: download (object storage), preprocess, key, mark done.

Plain Python (no Ray): ``pipeline.distributed.ingest`` maps ``run_unit`` over the items.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.config import PreprocessConfig
from pipeline.ingest.manifest import empty_row
from pipeline.ingest.phi import key_for_source
from pipeline.ingest.preprocess import preprocess_unit
from pipeline.ingest.resume import write_done
from pipeline.io.filesystems import download, is_remote, remove_tree
from pipeline.io.layouts import Item


def run_unit(item: Item | dict, cfg: PreprocessConfig, out_dir: str | Path, key: str,
             patient_keys: dict[str, str] | None = None, secret: str | None = None) -> list[dict]:
    """Manifest rows of one discovered item (see ``preprocess_unit``), each with ``content_key`` = ``key``;
    ``patient_key`` from ``patient_keys`` (patients.csv, already keyed) where it names the row's source.

    An object-store item's files are downloaded to a local temporary folder first and deleted afterwards.
    Ends by writing the item's done marker (``pipeline.ingest.resume``); a failed download gives a rejected
    row without a marker, and so does a row with a patient ID that could not be keyed (no secret): the driver
    refuses such a run, and the rerun with a secret processes the item again.
    """
    item = Item.from_dict(item) if isinstance(item, dict) else item
    local_dir = None
    try:
        if is_remote(cfg.input):
            local_dir = tempfile.mkdtemp(prefix="anatdiff-item-")
            try:
                download(cfg.input, item.files, local_dir)
            except OSError as e:  # transient: no done marker, so a rerun tries again
                return [empty_row(item_id=item.item_id, source=item.source, files=list(item.files),
                                  kind=item.kind, status="rejected", content_key=key,
                                  reason=f"download failed: {type(e).__name__} (the next run tries again)")]
        rows = preprocess_unit(item.rebased(local_dir) if local_dir else item, cfg, out_dir, secret)
    finally:
        if local_dir is not None:
            remove_tree(local_dir)
    for row in rows:
        row["content_key"] = key
        listed = key_for_source(row["source"], patient_keys or {}) if row["status"] != "skipped" else None
        if listed:
            row["patient_key"] = listed
            row.pop("unkeyed_patient", None)
    if not any(r.get("unkeyed_patient") for r in rows):
        write_done(out_dir, item.item_id, key, rows)
    return rows
