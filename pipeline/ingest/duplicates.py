"""Copies of one DICOM series in several folders (same SeriesInstanceUID): ingested once, the others reported.

Each folder is processed by its own task, so copies meet only in the driver, which compares the rows'
private ``series_uid`` and ``slices_key`` (``pipeline.ingest.preprocess.slices_key``) before the manifest is
written.
"""

from __future__ import annotations

from pathlib import Path

_ARRAY_COLUMNS = ("image_path", "mask_path", "label_path")


def _keep_order(row: dict) -> tuple:
    """Which copy is kept: an accepted one, then the one with most files, then the first id."""
    return row["status"] != "accepted", -len(row.get("files") or []), row.get("item_id") or ""


def mark_duplicate_series(rows: list[dict], out_dir: str | Path) -> list[dict]:
    """``rows`` with every copy but one of each SeriesInstanceUID rejected ("duplicate series: ...") and the
    arrays it wrote deleted (a rerun processes such a folder again, so a copy becomes the kept one when the
    first goes away). The copy kept is accepted when one is, else the largest. Rows without a UID are left
    alone."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["status"] != "skipped" and r.get("series_uid"):
            groups.setdefault(r["series_uid"], []).append(i)
    out = list(rows)
    for idx in (g for g in groups.values() if len(g) > 1):
        keep, *others = sorted(idx, key=lambda i: _keep_order(rows[i]))
        kept = rows[keep]
        for i in others:
            row = dict(rows[i])
            same = row.get("slices_key") == kept.get("slices_key")
            what = ("a copy of" if same else "the same SeriesInstanceUID as, with other slices than,")
            for column in _ARRAY_COLUMNS:
                if row.get(column):
                    (Path(out_dir) / row[column]).unlink(missing_ok=True)
            row.update(status="rejected", image_path=None, mask_path=None, label_path=None, shape=None,
                       origin_xyz_mm=None, hu_hist_body=None,
                       reason=f"duplicate series: {what} item {kept['item_id']} ({len(row.get('files') or [])} files "
                              f"here, {len(kept.get('files') or [])} there); ingested once")
            out[i] = row
    return out
