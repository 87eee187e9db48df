"""`anatdiff train-guide`: self-supervised body-coordinate guide (3-D, or 1-D body-part regression with
--kind bpr) on Ray Train, scored on labelled phantoms and real scans.

Logs guide/guide.pt and, per labelled dataset (--eval-data NAME=DIR, repeatable), the landmark spread of the
learned, body-box and scanner frames (overall and per axis), the learned mm between organs against the
anatomy's, and per dataset (labelled or --real-data NAME=DIR) the label-free consistency in mm, the
cranio-caudal check and PNG slices of the coordinate maps to MLflow. Pretrain with it: model.guidance=learned,
model.guide_checkpoint=runs:/<run_id>.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import GuideConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("train-guide", __doc__.split(":", 1)[1].strip(), "guide-tiny")
    p.add_argument("--data", action="append", help="preprocessed unlabelled folder to learn from (repeatable: "
                                                   "phantoms and real CT; see data_weights)")
    p.add_argument("--eval-data", action="append", metavar="[NAME=]DIR",
                   help="preprocessed labelled folder for the landmark score (repeatable, BTCV or MSD layout)")
    p.add_argument("--real-data", action="append", metavar="[NAME=]DIR",
                   help="preprocessed real CT for the cranio-caudal check and the consistency score (repeatable)")
    p.add_argument("--kind", choices=("coords", "bpr"), help="coords: 3-D guide; bpr: body-part regression")
    p.add_argument("--run-name", help="Ray run name (same name resumes)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.guide import run_guide

        def one_or_many(v):
            return v[0] if v and len(v) == 1 else v

        cli = {"data": one_or_many(args.data), "eval_data": one_or_many(args.eval_data),
               "real_data": one_or_many(args.real_data), "run_name": args.run_name, "kind": args.kind}
        if args.steps is not None:
            cli["optim"] = {"steps": args.steps}
        out = run_guide(resolve(GuideConfig, args, cli))
        for k, v in sorted(out["metrics"].items()):
            print(f"  {k:45s} {v:.4f}")
        print(f"guide run {out['run_id']}: use model.guide_checkpoint=runs:/{out['run_id']}")
        return 0

    return guarded("train-guide", run)


if __name__ == "__main__":
    sys.exit(main())
