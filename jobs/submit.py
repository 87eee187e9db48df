"""`anatdiff submit`: run a job on a running Ray cluster through its job API (JobSubmissionClient).

Uploads this repository as the job's working_dir (less .venv, .git, runs, local MLflow stores), installs
requirements.lock there unless --requirements none, copies MLFLOW_TRACKING_URI, storage settings and each
--env KEY from this shell (names are printed, values never), and prints the job id. With --follow it streams
the logs and exits 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.

  anatdiff submit pretrain --address http://127.0.0.1:8265 --config pretrain-gpu --set data=s3://b/ct --follow

Same thing without anatdiff installed locally (docs/running-on-a-cluster.md):
  ray job submit --address URL --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain-gpu.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs._common import guarded


def default_working_dir() -> Path:
    """The current directory when it is an anatdiff checkout, else the checkout this module lives in."""
    cwd = Path.cwd()
    if (cwd / "jobs").is_dir() and (cwd / "pipeline").is_dir():
        return cwd
    return Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anatdiff submit", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="job module: synth, preprocess, pretrain, evaluate, demo, ...")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="Ray job API URL, http(s)://host:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--config", metavar="FILE|PRESET", help="config file (any path) or preset in jobs/configs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--follow", action="store_true", help="stream logs; exit 0 on SUCCEEDED, 1 otherwise")
    p.add_argument("--working-dir", type=Path, default=None, help="checkout to upload (default: this one)")
    p.add_argument("--requirements", choices=["lock", "none"], default="lock",
                   help="lock: Ray pip-installs requirements.lock; none: the cluster image has our deps")
    p.add_argument("--image", help="run in this container image (code and presets from the image)")
    p.add_argument("--env", action="append", default=[], metavar="KEY",
                   help="copy this environment variable to the job (repeatable; its value is never printed)")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.config import UserError
        from pipeline.distributed.submit import follow, submit

        if not args.address:
            raise UserError("--address is required (or set RAY_API_SERVER_ADDRESS), e.g. http://127.0.0.1:8265")
        client, job_id = submit(args.address, args.job, args.config, args.set,
                                args.working_dir or default_working_dir(), args.requirements, args.image,
                                args.env)
        print(f"submitted job {job_id}")
        if not args.follow:
            print(f"  logs: ray job logs --address {args.address} --follow {job_id}")
            print(f"  stop: ray job stop --address {args.address} {job_id}")
            return 0
        status = follow(client, job_id, lambda s: print(s, end="", flush=True))
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1

    return guarded("submit", run)


if __name__ == "__main__":
    sys.exit(main())
