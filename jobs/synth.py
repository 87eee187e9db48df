"""`anatdiff synth`: write a synthetic CT phantom corpus (NIfTI or DICOM, optionally labelled)."""

from __future__ import annotations

import sys

from jobs._common import guarded, job_parser, resolve
from pipeline.config import SynthConfig


def main(argv: list[str] | None = None) -> int:
    p = job_parser("synth", __doc__.split(":", 1)[1].strip(), None)
    p.add_argument("--out", help="output folder")
    p.add_argument("--n", type=int, help="number of phantoms (default 8)")
    p.add_argument("--seed", type=int, help="base seed (default 0)")
    p.add_argument("--format", choices=["nifti", "dicom"], help="file format (default nifti)")
    p.add_argument("--labels", action="store_true", default=None,
                   help="also write BTCV labels + dataset.json (nnU-Net/MSD layout)")
    p.add_argument("--spacing-mm", type=float, help="force one isotropic spacing (else per scanner)")
    p.add_argument("--workers", type=int, help="processes (0 = all cores)")
    args = p.parse_args(argv)

    def run() -> int:
        from pipeline.synth.corpus import synthesize_corpus

        cfg = resolve(SynthConfig, args, {"out": args.out, "n": args.n, "seed": args.seed,
                                          "format": args.format, "labels": args.labels,
                                          "spacing_mm": args.spacing_mm, "workers": args.workers})
        records = synthesize_corpus(cfg, progress=_progress)
        print(f"\nwrote {len(records)} phantoms to {cfg.out}")
        return 0

    return guarded("synth", run)


def _progress(done: int, total: int) -> None:
    print(f"\r  synth {done}/{total}", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
