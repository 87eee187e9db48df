"""`anatdiff evaluate`: segmentation Dice of a pretrained backbone (linear / nonlinear head on frozen features,
or finetune), on a patient-level holdout or k-fold cross-validation, logged to MLflow (a child run per fold).

The same protocol on the same architecture from random initialization gives the baseline row.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import EvaluateConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("evaluate", __doc__.split(":", 1)[1].strip(), "evaluate-tiny")
    p.add_argument("--data", help="preprocessed labelled folder (with manifest.parquet)")
    p.add_argument("--pretrain-run-id", help="MLflow run id of the pretrain job")
    p.add_argument("--checkpoint", help="or a model.pt path / checkpoint folder")
    p.add_argument("--protocol", choices=["nonlinear", "linear", "finetune"], help="evaluation protocol")
    p.add_argument("--split", choices=["holdout", "kfold"], help="patient-level holdout or k-fold CV")
    p.add_argument("--folds", type=int, help="number of folds (implies --split kfold)")
    p.add_argument("--train-cases", type=int, help="training patients per fold (label-efficiency curves)")
    p.add_argument("--test-data", help="score on this other labelled dataset (train on every case of --data)")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.evaluate import run_evaluate

        split = args.split or ("kfold" if args.folds is not None else None)
        cfg = resolve(EvaluateConfig, args, {
            "data": args.data, "pretrain_run_id": args.pretrain_run_id, "checkpoint": args.checkpoint,
            "protocol": args.protocol, "split": split, "folds": args.folds, "train_cases": args.train_cases,
            "test_data": args.test_data})
        out = run_evaluate(cfg)
        print(out["table"])
        print(f"evaluate run {out['run_id']} logged to {out['tracking_uri']}")
        return 0

    return guarded("evaluate", run)


if __name__ == "__main__":
    sys.exit(main())
