"""The tables of a predict run: ``predictions.csv`` (one row per input: predicted, rejected with its reason,
or skipped), ``organ_volumes.csv`` (one row per predicted scan, mL per organ) and ``report.json``.

``predictions.csv`` maps each output name (``item_id``) to the input it came from (``source``): that readable
mapping stays in the output folder, never in a log line or MLflow.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline.io.atomic import write_atomic
from pipeline.labels import ORGANS
from pipeline.predict.scan import STATUSES

PREDICTIONS_CSV = "predictions.csv"
VOLUMES_CSV = "organ_volumes.csv"
REPORT_JSON = "report.json"
_COLUMNS = ("item_id", "source", "kind", "status", "reason", "label_path", "overlay_path", "seg_path", "n_files",
            "size_xyz", "spacing_xyz_mm", "seconds", "dice_note")


def predictions_table(rows: list[dict]) -> pd.DataFrame:
    """One line per row, sorted by status then item_id / source; ``dice_<organ>`` columns for the organs
    scored against a reference label (labelled inputs only)."""
    scored = [o for o in ORGANS if any(o in (r.get("dice") or {}) for r in rows)]
    records = []
    for r in sorted(rows, key=lambda r: (STATUSES.index(r["status"]), r["item_id"] or "", r["source"] or "")):
        rec = {c: r.get(c) for c in _COLUMNS}
        rec["n_files"] = len(r.get("files") or [])
        for c in ("size_xyz", "spacing_xyz_mm"):
            rec[c] = " ".join(f"{v:g}" for v in r[c]) if r.get(c) else None
        rec.update({f"dice_{o}": (r.get("dice") or {}).get(o) for o in scored})
        records.append(rec)
    return pd.DataFrame(records, columns=[*_COLUMNS, *(f"dice_{o}" for o in scored)])


def volumes_table(rows: list[dict]) -> pd.DataFrame:
    """``item_id`` and ``<organ>_ml`` (13 organs, millilitres) of every predicted row, sorted by item_id."""
    columns = ["item_id", *(f"{o}_ml" for o in ORGANS)]
    records = [{"item_id": r["item_id"], **r["volumes_ml"]} for r in rows if r["status"] == "predicted"]
    return pd.DataFrame(sorted(records, key=lambda r: r["item_id"]), columns=columns)


def summary_line(rows: list[dict]) -> str:
    """``N predicted, M rejected (reason class: n, ...), K skipped`` (no names, paths or ids)."""
    status = Counter(r["status"] for r in rows)
    reasons = Counter((r["reason"] or "").split(":", 1)[0].strip() for r in rows if r["status"] == "rejected")
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items()))
    return (f"{status['predicted']} predicted, {status['rejected']} rejected" + (f" ({detail})" if detail else "")
            + f", {status['skipped']} skipped")


def unaccounted_files(rows: list[dict], listed: list[str]) -> dict[str, list[str]]:
    """Input files in no row (``missing``) or in several (``duplicated``): both empty when every file is
    accounted for exactly once."""
    seen = Counter(f for r in rows for f in r.get("files") or [])
    return {"missing": sorted(set(listed) - set(seen)), "duplicated": sorted(f for f, n in seen.items() if n > 1)}


def write_tables(rows: list[dict], out_dir: str | Path, info: dict) -> dict:
    """Write ``predictions.csv``, ``organ_volumes.csv`` and ``report.json`` (``info`` plus the counts) atomically;
    return the report."""
    out_dir = Path(out_dir)
    predictions, volumes = predictions_table(rows), volumes_table(rows)
    write_atomic(out_dir / PREDICTIONS_CSV, lambda p: predictions.to_csv(p, index=False))
    write_atomic(out_dir / VOLUMES_CSV, lambda p: volumes.to_csv(p, index=False, float_format="%.3f"))
    report = {**info, "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
              "summary": summary_line(rows)}
    write_atomic(out_dir / REPORT_JSON, lambda p: p.write_text(json.dumps(report, indent=1)))
    return report
