"""`anatdiff predict`: segment new scans with a trained segmenter, label maps on each scan's original grid.

Reads one scan, a folder of scans or DICOM series, or an s3:// / gs:// prefix through the preprocess
ingestion (same QC, same PHI rules); writes <item_id>.nii.gz (uint8 BTCV labels, the input's size, spacing,
origin and direction), overlays/<item_id>.png, predictions.csv (every input: predicted, rejected with its
reason, or skipped), organ_volumes.csv (mL) and report.json. Ray Data actors each hold one model (one GPU
per actor where there are GPUs). A rerun skips finished scans.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._common import guarded, job_parser, resolve
from pipeline.config import PredictConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("predict", __doc__.split(":", 1)[1].strip(), None)
    p.add_argument("--model", help="runs:/<run_id>/<path>, models:/<name>@<alias>, models:/<name>/<version> "
                                   "or a segmenter folder")
    p.add_argument("--input", help="a scan file, a folder of scans / DICOM series, s3://bucket/prefix, gs://...")
    p.add_argument("--output", help="output folder")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.distributed.predict import run_predict

        cfg = resolve(PredictConfig, args, {"model": args.model, "input": args.input, "output": args.output})
        report = run_predict(cfg)
        print(report["summary"])
        print(f"predictions: {Path(cfg.output) / 'predictions.csv'}")
        return 0

    return guarded("predict", run)


if __name__ == "__main__":
    sys.exit(main())
