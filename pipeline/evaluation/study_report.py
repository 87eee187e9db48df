"""The phantom study's results as a table, a label-efficiency plot and one JSON object (pure numpy/matplotlib).

A row is one (protocol, variant, train_cases) evaluation: mean and std of the mean Dice across folds. The
ceiling is the supervised row (the random-init network with all weights trained) at each label budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

VARIANT_NAMES = {"random_init": "random init", "restorative": "restorative (Models Genesis)",
                 "contrastive": "contrastive (vox2vec)", "unguided": "diffusion, unguided",
                 "guided_bodybox": "diffusion, body-box guide", "guided_learned": "diffusion, learned guide",
                 "guided_bpr": "diffusion, body-part regression guide",
                 "ceiling": "supervised ceiling"}


@dataclass
class StudyRow:
    protocol: str            # linear | nonlinear | finetune | supervised (the ceiling)
    variant: str             # a STUDY_VARIANTS name, or "ceiling"
    train_cases: int | str   # patients per fold, or "all"
    mean: float
    std: float
    run_id: str = ""
    n_train: float = float("nan")   # mean training patients per fold (x of the label-efficiency plot)

    def as_json(self) -> dict:
        return {"protocol": self.protocol, "variant": self.variant, "train_cases": self.train_cases,
                "mean": _num(self.mean), "std": _num(self.std)}


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def _cell(row: StudyRow | None) -> str:
    return "-" if row is None or not np.isfinite(row.mean) else f"{row.mean:.3f} ± {row.std:.3f}"


def study_table(rows: list[StudyRow]) -> str:
    """Markdown: one table per protocol, variants x label budgets (mean ± std across folds); the ceiling row
    closes every table."""
    budgets = list(dict.fromkeys(r.train_cases for r in rows))
    cell = {(r.protocol, r.variant, r.train_cases): r for r in rows}
    ceiling = {r.train_cases: r for r in rows if r.variant == "ceiling"}
    out = []
    for protocol in dict.fromkeys(r.protocol for r in rows if r.variant != "ceiling"):
        variants = list(dict.fromkeys(r.variant for r in rows if r.protocol == protocol))
        out += [f"### {protocol}", "", "| pretraining | " + " | ".join(f"train cases {b}" for b in budgets) + " |",
                "|---|" + "---:|" * len(budgets)]
        for v in variants:
            out.append(f"| {VARIANT_NAMES.get(v, v)} | "
                       + " | ".join(_cell(cell.get((protocol, v, b))) for b in budgets) + " |")
        if ceiling:
            out.append(f"| *{VARIANT_NAMES['ceiling']}* | " + " | ".join(_cell(ceiling.get(b)) for b in budgets)
                       + " |")
        out.append("")
    return "\n".join(out)


def label_efficiency_png(rows: list[StudyRow], path: str | Path) -> Path:
    """PNG: one panel per protocol, mean Dice (error bars: std across folds) against training patients per
    fold, one line per variant; the supervised ceiling dashed in every panel."""
    protocols = list(dict.fromkeys(r.protocol for r in rows if r.variant != "ceiling"))
    ceiling = sorted((r for r in rows if r.variant == "ceiling"), key=lambda r: r.n_train)
    fig = Figure(figsize=(4.2 * max(1, len(protocols)), 3.8), layout="constrained")
    for i, protocol in enumerate(protocols):
        ax = fig.add_subplot(1, len(protocols), i + 1)
        for v in dict.fromkeys(r.variant for r in rows if r.protocol == protocol):
            line = sorted((r for r in rows if r.protocol == protocol and r.variant == v), key=lambda r: r.n_train)
            ax.errorbar([r.n_train for r in line], [r.mean for r in line], yerr=[r.std for r in line],
                        marker="o", capsize=3, label=VARIANT_NAMES.get(v, v))
        if ceiling:
            ax.errorbar([r.n_train for r in ceiling], [r.mean for r in ceiling], yerr=[r.std for r in ceiling],
                        color="black", linestyle="--", marker="s", capsize=3, label=VARIANT_NAMES["ceiling"])
        ax.set_title(protocol)
        ax.set_xlabel("training patients per fold")
        ax.set_ylabel("mean Dice (13 organs)")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="x-small", loc="upper left")
    fig.savefig(path, dpi=100)
    return Path(path)


def study_json(rows: list[StudyRow], wall_s: float) -> str:
    """One line: ``{"wall_s", "ceiling": {"mean", "std"} (largest budget), "rows": [...]}``."""
    ceilings = [r for r in rows if r.variant == "ceiling"]
    top = max(ceilings, key=lambda r: r.n_train) if ceilings else None
    return json.dumps({"wall_s": round(wall_s), "ceiling": {"mean": _num(top.mean), "std": _num(top.std)}
                       if top else None, "rows": [r.as_json() for r in rows if r.variant != "ceiling"]})
