"""`anatdiff study`: pretrain random-init, restorative, contrastive, unguided and guided diffusion (body box,
learned 3-D guide, body-part regression guide) on one phantom corpus with one budget, evaluate each with the
linear, nonlinear and finetune protocols at several label budgets (k-fold), add the supervised ceiling, and
compare.

`--preset phantom-small` is the CPU benchmark (within 2 hours on 2 cores, docs/evaluation.md). The last line
printed is one JSON object: {"wall_s", "ceiling": {"mean", "std"}, "rows": [{"protocol", "variant",
"train_cases", "mean", "std"}, ...]}.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import StudyConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("study", __doc__.split(":", 1)[1].strip(), "study-phantom-small")
    p.add_argument("--preset", help="study preset name: study-<PRESET> under jobs/configs (e.g. phantom-small)")
    p.add_argument("--workdir", help="folder for corpora, volumes and checkpoints")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.study import run_study

        if args.preset:
            args.config = args.preset if args.preset.startswith("study-") else f"study-{args.preset}"
        cfg = resolve(StudyConfig, args, {"workdir": args.workdir})
        out = run_study(cfg)
        print(out["compare"]["markdown"])
        print(out["table"])
        print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in out["seconds"].items()))
        print(out["json"])   # last line: one JSON object, to track results across commits
        return 0

    return guarded("study", run)


if __name__ == "__main__":
    sys.exit(main())
