"""`anatdiff demo`: the whole system on embedded defaults: synth -> preprocess -> train-guide -> pretrain ->
evaluate -> train-segmenter -> predict.

Runs on a local Ray instance with MLflow in sqlite:///mlflow.db (unless MLFLOW_TRACKING_URI is set) and
prints a Dice table on held-out phantoms: pretrained vs random init (frozen features, non-linear head) and
the supervised ceiling, per organ, then registers a segmenter and predicts the real scans.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import DemoConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("demo", __doc__.split(":", 1)[1].strip(), "demo")
    p.add_argument("--workdir", help="folder for the corpus, volumes and checkpoints (default anatdiff-demo)")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.demo import run_demo

        cfg = resolve(DemoConfig, args, {"workdir": args.workdir})
        run_demo(cfg)
        return 0

    return guarded("demo", run)


if __name__ == "__main__":
    sys.exit(main())
