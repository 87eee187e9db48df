"""The `anatdiff` console command: one subcommand per job, each also runnable as `python -m jobs.<name>`."""

from __future__ import annotations

import importlib
import sys

from pipeline.registry import JOBS

#: command -> (entry module, one-line help), from the one job registry (pipeline/registry.py)
COMMANDS: dict[str, tuple[str, str]] = {job.command: (job.entry, job.help) for job in JOBS}

USAGE = """usage: anatdiff <command> [options]

Anatomically guided diffusion pretraining for 3D CT segmentation, on Ray, tracked in MLflow.

commands:
{commands}

Run `anatdiff <command> --help` for a command's options. Every command takes --config FILE|PRESET and
--set KEY=VALUE; presets live in jobs/configs/. MLflow: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
A Ray cluster is used when RAY_ADDRESS is set, else a local Ray instance starts.
"""


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"anatdiff {version('anatdiff')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"anatdiff: error: unknown command '{name}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
