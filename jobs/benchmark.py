"""`anatdiff benchmark NAME`: measured speed/memory figures; the last output line is one JSON object.

Names: preprocess, patches (issue 3), train (issue 5), gpu (the bf16 / nccl path of the GPU presets).
Each runs its baseline in the same process, so the
ratios compare like with like on this machine; numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from jobs._common import guarded

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
    args = p.parse_args(argv)

    def run() -> int:
        module = importlib.import_module(BENCHMARKS[args.name])
        figures = module.run(workdir=args.workdir, quick=args.quick)
        line = json.dumps(figures, sort_keys=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")
        print(line)
        return 0

    return guarded("benchmark", run)


if __name__ == "__main__":
    sys.exit(main())
