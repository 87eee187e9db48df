"""`anatdiff pretrain`: guided DDPM pretraining of a 3D UNet on Ray Train; checkpoints + MLflow.

Rerunning with the same run_name and storage_path resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import PretrainConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("pretrain", __doc__.split(":", 1)[1].strip(), "pretrain-tiny")
    p.add_argument("--data", help="preprocessed folder (with manifest.parquet)")
    p.add_argument("--run-name", help="Ray run name (same name resumes)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.pretrain import run_pretrain

        cli = {"data": args.data, "run_name": args.run_name}
        if args.steps is not None:
            cli["optim"] = {"steps": args.steps}
        if args.workers is not None:
            cli["scaling"] = {"num_workers": args.workers}
        cfg = resolve(PretrainConfig, args, cli)
        out = run_pretrain(cfg)
        print(f"pretrain run {out['run_id']} finished; checkpoint {out['checkpoint']}")
        return 0

    return guarded("pretrain", run)


if __name__ == "__main__":
    sys.exit(main())
