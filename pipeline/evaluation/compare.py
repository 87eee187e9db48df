"""`anatdiff compare`: mean Dice across pretraining runs, per protocol and per organ, as tables and a chart.

Inputs are evaluate runs, or pretrain runs whose (newest finished) evaluate runs are found by the tag
``anatdiff.pretrain_run_id``. A row is labelled by the pretraining variant (the pretrain run's tags
``anatdiff.objective`` / ``anatdiff.guidance``). The comparison is logged to its own MLflow run
(``anatdiff.job=compare``): ``compare.md``, ``compare.csv``, ``compare.png``.
"""

from __future__ import annotations

import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline import tracking
from pipeline.config import CompareConfig, UserError
from pipeline.labels import ORGANS

PROTOCOLS = ("linear", "nonlinear", "finetune")


@dataclass
class CompareRow:
    """One evaluate run: its variant label, protocol and across-fold Dice (``organ_*``: (13,) float64)."""

    label: str
    protocol: str
    run_id: str
    mean: float
    std: float
    organ_mean: np.ndarray
    organ_std: np.ndarray
    n_folds: int = 1


def variant_label(objective: str, guidance: str, guide_kind: str = "") -> str:
    """Human name of a pretraining variant from its objective, guidance and (learned guidance) guide kind."""
    if objective == "none":
        return "random init"
    if objective == "restorative":
        return "restorative"
    if objective == "contrastive":
        return "contrastive (vox2vec)"
    if objective == "diffusion":
        if guidance == "learned" and guide_kind == "bpr":
            return "diffusion (body-part regression guide)"
        return {"none": "diffusion (unguided)", "bodybox": "diffusion (body-box guide)",
                "learned": "diffusion (learned guide)"}.get(guidance, f"diffusion ({guidance})")
    return objective or "unknown"


def row_from_metrics(label: str, protocol: str, run_id: str, metrics: dict[str, float],
                     n_folds: int = 1) -> CompareRow:
    """A row from an evaluate run's metrics (``dice_<organ>``, ``dice_<organ>_std``, ``dice_mean[_std]``)."""
    def get(key: str) -> float:
        return float(metrics.get(key, np.nan))

    return CompareRow(label, protocol, run_id, get("dice_mean"), get("dice_mean_std"),
                      np.array([get(f"dice_{o}") for o in ORGANS]), np.array([get(f"dice_{o}_std") for o in ORGANS]),
                      n_folds)


def _cell(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def comparison_markdown(rows: list[CompareRow]) -> str:
    """Markdown: a summary table (variant x protocol, mean Dice ± std across folds), then one per-organ
    table per protocol (organ x variant)."""
    if not rows:
        raise ValueError("comparison_markdown needs at least one row, got none")
    labels = list(dict.fromkeys(r.label for r in rows))
    protocols = [p for p in PROTOCOLS if any(r.protocol == p for r in rows)]
    cell = {(r.label, r.protocol): r for r in rows}
    out = ["## Mean Dice (mean ± std across folds)", "", "| pretraining | " + " | ".join(protocols) + " |",
           "|---|" + "---:|" * len(protocols)]
    for label in labels:
        out.append(f"| {label} | " + " | ".join(_cell(cell[label, p].mean, cell[label, p].std)
                                               if (label, p) in cell else "-" for p in protocols) + " |")
    for p in protocols:
        present = [lab for lab in labels if (lab, p) in cell]
        out += ["", f"## Dice per organ, {p}", "", "| organ | " + " | ".join(present) + " |",
                "|---|" + "---:|" * len(present)]
        for k, organ in enumerate(ORGANS):
            out.append(f"| {organ} | " + " | ".join(_cell(cell[lab, p].organ_mean[k], cell[lab, p].organ_std[k])
                                                    for lab in present) + " |")
    return "\n".join(out) + "\n"


def comparison_csv(rows: list[CompareRow]) -> str:
    """CSV: label, protocol, run_id, n_folds, dice_mean, dice_mean_std, dice_<organ>..."""
    buf = io.StringIO()
    buf.write("label,protocol,run_id,n_folds,dice_mean,dice_mean_std," + ",".join(f"dice_{o}" for o in ORGANS) + "\n")
    for r in rows:
        buf.write(f"{r.label},{r.protocol},{r.run_id},{r.n_folds},{r.mean:.6f},{r.std:.6f},"
                  + ",".join(f"{v:.6f}" for v in r.organ_mean) + "\n")
    return buf.getvalue()


def comparison_chart(rows: list[CompareRow], path: str | Path) -> Path:
    """PNG: one group of bars per protocol, one bar per variant (mean Dice, error bar = std across folds)."""
    labels = list(dict.fromkeys(r.label for r in rows))
    protocols = [p for p in PROTOCOLS if any(r.protocol == p for r in rows)]
    cell = {(r.label, r.protocol): r for r in rows}
    fig = Figure(figsize=(max(5.0, 1.8 * len(protocols) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        means = [cell[label, p].mean if (label, p) in cell else np.nan for p in protocols]
        stds = [cell[label, p].std if (label, p) in cell else np.nan for p in protocols]
        x = np.arange(len(protocols)) + (i - (len(labels) - 1) / 2) * width
        ax.bar(x, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=3, label=label)
    ax.set_xticks(np.arange(len(protocols)), protocols)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("mean Dice")
    ax.set_title("Downstream segmentation by pretraining variant")
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=100)
    return Path(path)


def _evaluate_runs(uri: str, run_id: str, protocol: str | None) -> list:
    """The evaluate run itself, or a pretrain run's newest finished evaluate run per protocol."""
    run = tracking.get_run(uri, run_id)
    job = run.data.tags.get("anatdiff.job", "")
    if job == "evaluate":
        if protocol and run.data.tags.get("anatdiff.protocol") != protocol:
            return []
        return [run]
    if job != "pretrain":
        raise UserError(f"run {run_id} is neither an evaluate nor a pretrain run (anatdiff.job={job!r})")
    filt = (f"tags.`anatdiff.pretrain_run_id` = '{run_id}' and tags.`anatdiff.job` = 'evaluate' "
            "and attributes.status = 'FINISHED'")
    if protocol:
        filt += f" and tags.`anatdiff.protocol` = '{protocol}'"
    newest: dict[str, object] = {}
    for r in tracking.find_runs(uri, filt):
        newest.setdefault(r.data.tags.get("anatdiff.protocol", ""), r)
    return list(newest.values())


def collect_rows(uri: str, run_ids: tuple[str, ...] | list[str], protocol: str | None = None) -> list[CompareRow]:
    """Rows of every evaluate run that ``run_ids`` name (see module docstring); UserError if one has none."""
    rows = []
    for run_id in run_ids:
        found = _evaluate_runs(uri, run_id, protocol)
        if not found:
            raise UserError(f"run {run_id} has no finished evaluate run" + (f" with protocol {protocol}"
                                                                           if protocol else "")
                            + ": run `anatdiff evaluate --pretrain-run-id ...` first")
        for run in found:
            tags, params = run.data.tags, run.data.params
            pre = tags.get("anatdiff.pretrain_run_id", "")
            ptags = tracking.get_run(uri, pre).data.tags if pre else tags
            label = variant_label(ptags.get("anatdiff.objective", ""), ptags.get("anatdiff.guidance", ""),
                                  ptags.get("anatdiff.guide_kind", ""))
            rows.append(row_from_metrics(label, tags.get("anatdiff.protocol", ""), run.info.run_id,
                                         run.data.metrics, int(params.get("n_folds", 1))))
    seen: dict[tuple[str, str], int] = {}
    for r in rows:  # two runs of one variant and protocol: tell them apart by run id
        seen[r.label, r.protocol] = seen.get((r.label, r.protocol), 0) + 1
    for r in rows:
        if seen[r.label, r.protocol] > 1:
            r.label = f"{r.label} [{r.run_id[:8]}]"
    return rows


def run_compare(cfg: CompareConfig) -> dict:
    """Build the comparison and log it to a new MLflow run. Returns run_id, tracking_uri, markdown, rows."""
    uri = tracking.connect(cfg.tracking.tracking_uri)
    rows = collect_rows(uri, cfg.run_ids, cfg.protocol)
    markdown = comparison_markdown(rows)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.name, tags={
        "anatdiff.job": "compare", "anatdiff.compared_runs": ",".join(cfg.run_ids),
        "anatdiff.protocol": cfg.protocol or "all"})
    with tracking.run_status(uri, run_id), tempfile.TemporaryDirectory() as tmp:
        tracking.log_params(uri, run_id, {"run_ids": ",".join(cfg.run_ids), "protocol": cfg.protocol or "all",
                                          "evaluate_run_ids": ",".join(r.run_id for r in rows)})
        tracking.log_metrics(uri, run_id, {f"dice_mean.{r.protocol}.{_slug(r.label)}": r.mean for r in rows})
        files = {"compare.md": markdown, "compare.csv": comparison_csv(rows)}
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
            tracking.log_artifact(uri, run_id, Path(tmp) / name)
        tracking.log_artifact(uri, run_id, comparison_chart(rows, Path(tmp) / "compare.png"))
    return {"run_id": run_id, "tracking_uri": uri, "markdown": markdown, "rows": rows}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
