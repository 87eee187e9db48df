"""`anatdiff compare`: a table and chart of mean Dice (and per organ) across pretraining runs, logged to MLflow.

Give evaluate run ids, or pretrain run ids (their newest finished evaluate runs are found by tag).
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import CompareConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("compare", __doc__.split(":", 1)[1].strip(), None)
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="evaluate or pretrain run ids")
    p.add_argument("--protocol", choices=["nonlinear", "linear", "finetune"], help="only this protocol")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.evaluation.compare import run_compare

        cfg = resolve(CompareConfig, args, {"run_ids": args.run_ids or None, "protocol": args.protocol})
        out = run_compare(cfg)
        print(out["markdown"])
        print(f"compare run {out['run_id']} logged to {out['tracking_uri']}")
        return 0

    return guarded("compare", run)


if __name__ == "__main__":
    sys.exit(main())
