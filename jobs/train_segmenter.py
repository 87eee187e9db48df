"""`anatdiff train-segmenter`: train the downstream segmenter on ALL labelled cases (several folders may be
combined, e.g. phantoms and real scans), save it with its preprocessing conventions and model card, log it to
MLflow as an `mlflow.pytorch` model and register it (`anatdiff-segmenter`, alias `current`).

Score a segmenter with `anatdiff evaluate` (k-fold or --test-data); run it on new scans with `anatdiff predict
--model models:/anatdiff-segmenter@current --input SCAN --output DIR`.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import SegmenterConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("train-segmenter", __doc__.split(":", 1)[1].strip(), "segmenter-tiny")
    p.add_argument("--data", action="append", help="preprocessed labelled folder (repeatable)")
    p.add_argument("--pretrain-run-id", help="MLflow run id of the pretrain job")
    p.add_argument("--checkpoint", help="or a model.pt path / checkpoint folder")
    p.add_argument("--protocol", choices=["nonlinear", "linear", "finetune"], help="what trains")
    p.add_argument("--alias", help="registry alias (default current)")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.segmenter import run_train_segmenter

        cfg = resolve(SegmenterConfig, args, {
            "data": args.data, "pretrain_run_id": args.pretrain_run_id, "checkpoint": args.checkpoint,
            "protocol": args.protocol, "alias": args.alias})
        out = run_train_segmenter(cfg)
        print(f"segmenter run {out['run_id']} logged to {out['tracking_uri']}; model {out['model_uri']}")
        return 0

    return guarded("train-segmenter", run)


if __name__ == "__main__":
    sys.exit(main())
