"""The `anatdiff` console command: one subcommand per job, each also runnable as `python -m jobs.<name>`."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "synth -> preprocess -> train-guide -> pretrain -> evaluate -> train-segmenter -> "
                          "predict, local Ray + MLflow (~15 min on 2 cores)"),
    "synth": ("jobs.synth", "write a synthetic CT phantom corpus (NIfTI or DICOM, optional labels)"),
    "preprocess": ("jobs.preprocess", "Ray Data: CT corpus -> canonical resampled volumes + manifest"),
    "train-guide": ("jobs.train_guide", "Ray Train: the self-supervised body-coordinate guide, scored"),
    "pretrain": ("jobs.pretrain", "Ray Train: guided diffusion pretraining of a 3D UNet"),
    "submit": ("jobs.submit", "run a job on a running Ray cluster through its job API (JobSubmissionClient)"),
    "benchmark": ("jobs.benchmark", "measured speed and memory: preprocess, patches, train, gpu (JSON last line)"),
    "evaluate": ("jobs.evaluate", "Dice (linear / nonlinear / finetune), holdout or k-fold, vs random init"),
    "train-segmenter": ("jobs.train_segmenter", "train the segmenter on every labelled case, register it in "
                                                "MLflow (anatdiff-segmenter)"),
    "compare": ("jobs.compare", "table + chart of mean Dice across pretraining runs, logged to MLflow"),
    "study": ("jobs.study", "phantom study: 4 pretraining variants x 3 protocols, then compare"),
    "export": ("jobs.export", "a pretrained backbone as a plain-PyTorch folder, registered in MLflow"),
    "predict": ("jobs.predict", "segment new scans with a trained segmenter: label maps on the original grid"),
}

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
