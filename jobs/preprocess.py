"""`anatdiff preprocess`: Ray Data turns a CT corpus into canonical, resampled, body-cropped volumes.

Reads NIfTI/NRRD/MHA files, DICOM series, BTCV and nnU-Net/MSD layouts from a folder or an s3:// / gs://
prefix; writes volumes/, labels/, masks/ (.npy), manifest.parquet (one row per item: accepted, rejected with a
reason, or skipped) and report.json / report.md. A rerun skips finished items.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._common import guarded, job_parser, resolve
from pipeline.config import PreprocessConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("preprocess", __doc__.split(":", 1)[1].strip(), None)
    p.add_argument("--input", help="input folder, or s3://bucket/prefix, gs://bucket/prefix")
    p.add_argument("--output", help="output folder")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="target spacing in mm, z y x (default 3 3 3)")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.ingest import run_preprocess
        from pipeline.ingest.manifest import summarize

        cfg = resolve(PreprocessConfig, args, {"input": args.input, "output": args.output,
                                               "target_spacing_zyx_mm": args.spacing})
        manifest = run_preprocess(cfg)
        print(summarize(manifest))
        print(f"report: {Path(cfg.output) / 'report.md'}")
        return 0

    return guarded("preprocess", run)


if __name__ == "__main__":
    sys.exit(main())
