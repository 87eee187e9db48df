"""`anatdiff study`: pretrain random-init, restorative, unguided and guided diffusion on one phantom corpus
with one budget, evaluate each with the linear, nonlinear and finetune protocols (k-fold), and compare.

`--preset phantom-small` is the benchmark that fits 90 minutes on 2 CPU cores (see docs/evaluation.md).
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
        print("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in out["seconds"].items()))
        return 0

    return guarded("study", run)


if __name__ == "__main__":
    sys.exit(main())
