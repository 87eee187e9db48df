"""`anatdiff benchmark NAME`: measured speed/memory figures; the last output line is one JSON object.

Names: preprocess, patches (issue 3), train (issue 5; ``--objective``), gpu (the bf16 / nccl path of the GPU
presets: FLOPs, MFU, memory, largest batch; ``--device cpu`` runs it on the tiny presets).
Each runs its baseline in the same process, so the
ratios compare like with like on this machine; numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from jobs._common import guarded
from pipeline.config import UserError

BENCHMARKS = {
    "preprocess": "pipeline.benchmarks.preprocess",
    "patches": "pipeline.benchmarks.patches",
    "train": "pipeline.benchmarks.train",
    "gpu": "pipeline.benchmarks.gpu",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anatdiff benchmark", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("name", choices=sorted(BENCHMARKS), help="what to measure")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, numbers less stable)")
    p.add_argument("--out", default=None, help="also write the JSON figures to this file")
    p.add_argument("--objective", choices=["diffusion", "restorative", "contrastive"], default=None,
                   help="train only: the pretraining objective measured (default diffusion)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="gpu only: cuda (default), or cpu for a smoke run of the same code on the tiny presets")
    args = p.parse_args(argv)
    options = {k: v for k, v in (("objective", args.objective), ("device", args.device)) if v is not None}

    def run() -> int:
        allowed = {"objective": "train", "device": "gpu"}
        for option in options:
            if allowed[option] != args.name:
                raise UserError(f"--{option} applies to `anatdiff benchmark {allowed[option]}` only, "
                                f"not to '{args.name}'")
        module = importlib.import_module(BENCHMARKS[args.name])
        figures = module.run(workdir=args.workdir, quick=args.quick, **options)
        line = json.dumps(figures, sort_keys=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")
        print(line)
        return 0

    return guarded("benchmark", run)


if __name__ == "__main__":
    sys.exit(main())
