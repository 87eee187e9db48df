"""`anatdiff train-guide`: self-supervised 3D body-coordinate guide on Ray Train, scored on held-out phantoms.

Logs guide/guide.pt, guide_landmark_spread (learned, bodybox, scanner frames), the real-CT cranio-caudal
check and PNG slices of the coordinate maps to MLflow. Pretrain with it: model.guidance=learned,
model.guide_checkpoint=runs:/<run_id>.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import GuideConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("train-guide", __doc__.split(":", 1)[1].strip(), "guide-tiny")
    p.add_argument("--data", help="preprocessed unlabelled folder to learn from")
    p.add_argument("--eval-data", help="preprocessed labelled folder for the landmark score")
    p.add_argument("--real-data", help="preprocessed real CT for the cranio-caudal check")
    p.add_argument("--run-name", help="Ray run name (same name resumes)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.guide import run_guide

        cli = {"data": args.data, "eval_data": args.eval_data, "real_data": args.real_data,
               "run_name": args.run_name}
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
