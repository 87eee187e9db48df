"""The corpus report of a preprocess run: accounting, reasons, and per-scanner spacing / HU statistics.

Pure pandas/numpy; plots with matplotlib's Figure API (no pyplot state). Written by the driver as
``OUT/report.json``, ``OUT/report.md``, ``OUT/scanners.csv``, ``OUT/scanners.md`` and ``OUT/plots/*.png``; these
hold counts only: the paths of unaccounted files go to ``OUT/private/accounting.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.ingest.manifest import COLUMNS, empty_row, reason_class
from pipeline.ingest.private import write_private_records
from pipeline.io.atomic import write_atomic

#: HU histogram of body voxels: 64 bins over [-1024, 2000] HU; values outside go to the end bins
HU_EDGES = np.linspace(-1024.0, 2000.0, 65)


def hu_histogram(values_hu: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(64,) int64 counts of ``values_hu`` (any shape, HU; only where ``mask`` is True when given) over
    ``HU_EDGES``, clipped into the end bins so the counts sum to the number of values counted.

    Integer volumes are binned by integer arithmetic (the edges are 47.25 HU apart) without a float copy.
    """
    values = np.asarray(values_hu)
    if mask is not None:
        if np.shape(mask) != values.shape:
            raise ValueError(f"mask {np.shape(mask)} and values {values.shape} must have one shape")
    if values.dtype.kind in "iu":
        nbins = len(HU_EDGES) - 1
        lo, width4 = int(HU_EDGES[0]), int(round(4 * (HU_EDGES[1] - HU_EDGES[0])))
        flat = values.reshape(-1)
        keep = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        counts = np.zeros(nbins + 1, dtype=np.int64)
        for start in range(0, flat.size, 1 << 22):                  # bounded int32 temporaries
            chunk = slice(start, start + (1 << 22))
            bins = (flat[chunk].astype(np.int32) - lo) * 4 // width4   # exact: the width is 189 / 4 HU
            np.clip(bins, 0, nbins - 1, out=bins)
            if keep is not None:
                bins[~keep[chunk]] = nbins                           # an extra bin, dropped below
            counts += np.bincount(bins, minlength=nbins + 1)
        return counts[:nbins]
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    clipped = np.clip(np.asarray(values, dtype=np.float64).ravel(), HU_EDGES[0], HU_EDGES[-1])
    return np.histogram(clipped, bins=HU_EDGES)[0].astype(np.int64)


def hist_quantile_hu(counts: np.ndarray, q: float) -> float:
    """The ``q``-quantile (0..1) in HU of a ``HU_EDGES`` histogram, interpolated within its bin; NaN if empty."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        return float("nan")
    cdf = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    return float(np.interp(q, cdf, HU_EDGES))


def corpus_report(manifest: pd.DataFrame, input_files: list[str], extra: dict | None = None) -> dict:
    """Counts by status and reason, and the accounting check: every input file in exactly one row's
    ``files`` (``missing``: files in no row; ``duplicated``: in several rows; ``unknown``: rows' files that
    are not input files)."""
    listed = Counter(f for fs in manifest["files"] for f in fs)
    inputs = set(input_files)
    status = Counter(manifest["status"])

    def by_reason(s: str) -> dict[str, int]:
        return dict(sorted(Counter(reason_class(r) for r in manifest.loc[manifest.status == s, "reason"]).items()))
    return {"counts": {s: int(status.get(s, 0)) for s in ("accepted", "rejected", "skipped")},
            "rejected_by_reason": by_reason("rejected"), "skipped_by_reason": by_reason("skipped"),
            "files": {"input": len(inputs), "in_manifest": len(listed),
                      "missing": sorted(inputs - set(listed)),
                      "duplicated": sorted(f for f, n in listed.items() if n > 1),
                      "unknown": sorted(set(listed) - inputs)},
            **(extra or {})}


def _median(rows: pd.DataFrame, column: str, axis: int | None = None) -> float:
    values = [v if axis is None else v[axis] for v in rows[column] if v is not None and not
              (np.isscalar(v) and pd.isna(v))]
    return float(np.median(values)) if values else float("nan")


def scanner_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per ``scanner_key`` of the items (accepted + rejected): counts, median source spacing (z, y,
    x mm), median slice thickness and kVp, contrast share, body HU percentiles (5, 50, 95) of accepted items."""
    items = manifest[manifest.status != "skipped"]
    out = []
    for key, g in items.groupby(items["scanner_key"].fillna("unknown"), sort=True):
        acc = g[g.status == "accepted"]
        hist = np.sum([np.asarray(h) for h in acc["hu_hist_body"] if h is not None], axis=0) \
            if acc["hu_hist_body"].notna().any() else np.zeros(len(HU_EDGES) - 1)
        contrast = g["contrast"].dropna()
        out.append({"scanner_key": key, "items": len(g), "accepted": len(acc), "rejected": len(g) - len(acc),
                    **{f"spacing_{a}_mm": _median(acc, "spacing_mm", i) for i, a in enumerate("zyx")},
                    "slice_thickness_mm": _median(g, "slice_thickness_mm"), "kvp": _median(g, "kvp"),
                    "contrast_share": float(contrast.mean()) if len(contrast) else float("nan"),
                    **{f"body_hu_p{q}": hist_quantile_hu(hist, q / 100) for q in (5, 50, 95)}})
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` (floats with 2 decimals; NaN as '-')."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if np.isnan(v) else f"{v:.2f}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join(lines)


def report_markdown(report: dict, scanners: pd.DataFrame) -> str:
    """``report.md``: counts, reasons, accounting, per-scanner table."""
    c, f = report["counts"], report["files"]
    lines = ["# Preprocess report", "", f"- accepted: {c['accepted']}", f"- rejected: {c['rejected']}",
             f"- skipped: {c['skipped']}", f"- input files: {f['input']}, accounted: {f['in_manifest']}, "
             f"missing: {f['missing']}, duplicated: {f['duplicated']} (paths in private/accounting.json)", ""]
    for title, key in (("Rejected by reason", "rejected_by_reason"), ("Skipped by reason", "skipped_by_reason")):
        lines += [f"## {title}", ""] + ([f"- {r}: {n}" for r, n in report[key].items()] or ["- none"]) + [""]
    lines += ["## Per scanner", "", markdown_table(scanners), ""]
    return "\n".join(lines)


def plot_scanners(manifest: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``spacing.png`` (source spacing z vs in-plane x, mm, per scanner) and ``body_hu.png`` (body HU
    distribution per scanner) under ``out_dir``; returns their paths."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    acc = manifest[manifest.status == "accepted"]
    groups = list(acc.groupby(acc["scanner_key"].fillna("unknown"), sort=True))
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for key, g in groups:
        sp = np.array([list(v) for v in g["spacing_mm"]])
        ax.scatter(sp[:, 2], sp[:, 0], label=key, s=18)
    ax.set(xlabel="in-plane spacing x (mm)", ylabel="slice spacing z (mm)", title="source spacing per scanner")
    if groups:
        ax.legend(fontsize=7)
    paths = [out_dir / "spacing.png", out_dir / "body_hu.png"]
    fig.savefig(paths[0], dpi=80)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    centers = (HU_EDGES[1:] + HU_EDGES[:-1]) / 2
    for key, g in groups:
        hist = np.sum([np.asarray(h) for h in g["hu_hist_body"] if h is not None], axis=0)
        ax.plot(centers, hist / max(hist.sum(), 1), label=key)
    ax.set(xlabel="HU", ylabel="share of body voxels", title="body HU per scanner", yscale="log")
    if groups:
        ax.legend(fontsize=7)
    fig.savefig(paths[1], dpi=80)
    return paths


def public_report(report: dict) -> dict:
    """``report`` with its path lists (``files``: missing, duplicated, unknown) replaced by their counts."""
    files = {k: len(v) if isinstance(v, list) else v for k, v in report["files"].items()}
    return {**report, "files": files}


def write_reports(rows: list[dict], input_files: list[str], out_dir: str | Path,
                  extra: dict | None = None) -> tuple[dict, list[Path]]:
    """Write report.json, report.md, scanners.csv, scanners.md and plots/*.png into ``out_dir`` (counts, no
    path), and ``private/sources.csv`` + ``private/accounting.json`` (the paths) from the full manifest
    ``rows`` (with their ``files``); return the public report dict and the public paths."""
    out_dir = Path(out_dir)
    manifest = pd.DataFrame([empty_row(**r) for r in rows], columns=list(COLUMNS))
    full = corpus_report(manifest, input_files, extra)
    write_private_records(rows, {k: v for k, v in full["files"].items() if isinstance(v, list)}, out_dir)
    report = public_report(full)
    scanners = scanner_table(manifest)
    paths = [out_dir / n for n in ("report.json", "report.md", "scanners.csv", "scanners.md")]
    texts = (json.dumps(report, indent=2) + "\n", report_markdown(report, scanners),
             scanners.to_csv(index=False), markdown_table(scanners) + "\n")
    for path, text in zip(paths, texts):   # a temporary name, then rename: a killed job leaves no half file
        write_atomic(path, lambda tmp: tmp.write_text(text))
    return report, paths + plot_scanners(manifest, out_dir / "plots")
