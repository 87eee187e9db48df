"""`anatdiff export`: a pretrained backbone (and its guide) as a folder that loads with plain PyTorch
(the package anatdiff_backbone/ + weights.pt + config.json + README), also logged and registered in MLflow.
"""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import ExportConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("export", __doc__.split(":", 1)[1].strip(), None)
    p.add_argument("run_id", nargs="?", metavar="RUN_ID", help="MLflow run id of a pretrain job")
    p.add_argument("--checkpoint", help="or a model.pt path (no MLflow)")
    p.add_argument("--out", help="output folder")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.evaluation.export import run_export

        cfg = resolve(ExportConfig, args, {"run_id": args.run_id, "checkpoint": args.checkpoint, "out": args.out})
        out = run_export(cfg)
        print(f"exported to {out['out']}" + (f"; registered version {out['version']}" if out["version"] else ""))
        return 0

    return guarded("export", run)


if __name__ == "__main__":
    sys.exit(main())
