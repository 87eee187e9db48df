"""The one list of jobs: the `anatdiff` subcommands, the modules ``anatdiff submit`` runs on a cluster, the
config each one validates, and the one-line help the CLI and docs show.

``jobs/cli.py`` builds its commands from ``JOBS``; ``pipeline/distributed/submit.py`` takes the cluster jobs
and their config classes from here (a config is checked locally before anything is uploaded); a test checks
that README.md's command table names exactly these commands. The library never imports ``jobs``: entries
name their entry module as a string (``jobs.<module>``, run as ``python -m jobs.<module>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import (CompareConfig, DemoConfig, EvaluateConfig, ExportConfig, GuideConfig, PredictConfig,
                             PreprocessConfig, PretrainConfig, SegmenterConfig, StrictModel, StudyConfig,
                             SynthConfig, UserError)


@dataclass(frozen=True)
class Job:
    """One job. command: ``anatdiff <command>``; module: ``jobs/<module>.py`` (``main(argv) -> int``);
    config: the pydantic model its ``--config`` / ``--set`` resolve to (None: the job takes none);
    cluster: whether ``anatdiff submit`` may run it on a Ray cluster."""

    command: str
    module: str
    config: type[StrictModel] | None
    help: str
    cluster: bool = True

    @property
    def entry(self) -> str:
        """The importable entry module, ``jobs.<module>``."""
        return f"jobs.{self.module}"


JOBS: tuple[Job, ...] = (
    Job("demo", "demo", DemoConfig, "synth -> preprocess -> train-guide -> pretrain -> evaluate -> "
                                    "train-segmenter -> predict, local Ray + MLflow (~15 min on 2 cores)"),
    Job("synth", "synth", SynthConfig, "write a synthetic CT phantom corpus (NIfTI or DICOM, optional labels)"),
    Job("preprocess", "preprocess", PreprocessConfig,
        "Ray Data: CT corpus -> canonical resampled volumes + manifest"),
    Job("train-guide", "train_guide", GuideConfig, "Ray Train: the self-supervised body-coordinate guide, scored"),
    Job("pretrain", "pretrain", PretrainConfig, "Ray Train: guided diffusion pretraining of a 3D UNet"),
    Job("submit", "submit", None, "run a job on a running Ray cluster through its job API (JobSubmissionClient)",
        cluster=False),
    Job("benchmark", "benchmark", None, "measured speed and memory: preprocess, patches, train, gpu "
                                        "(JSON last line)"),
    Job("evaluate", "evaluate", EvaluateConfig,
        "Dice (linear / nonlinear / finetune), holdout or k-fold, vs random init"),
    Job("train-segmenter", "train_segmenter", SegmenterConfig,
        "train the segmenter on every labelled case, register it in MLflow (anatdiff-segmenter)"),
    Job("compare", "compare", CompareConfig,
        "table + chart of mean Dice across pretraining runs, logged to MLflow"),
    Job("study", "study", StudyConfig, "phantom study: pretraining variants x protocols x label budgets (k-fold), the supervised ceiling, "
                                       "then compare"),
    Job("export", "export", ExportConfig, "a pretrained backbone as a plain-PyTorch folder, registered in MLflow"),
    Job("predict", "predict", PredictConfig,
        "segment new scans with a trained segmenter: label maps on the original grid"),
)


def cluster_jobs() -> list[Job]:
    """The jobs ``anatdiff submit`` runs, in registry order."""
    return [j for j in JOBS if j.cluster]


def find_job(name: str, cluster: bool = False) -> Job:
    """The job named ``name`` (its command, ``train-guide``, or its module, ``train_guide``); UserError listing
    the choices when there is none (``cluster``: among the jobs ``anatdiff submit`` runs)."""
    jobs = cluster_jobs() if cluster else list(JOBS)
    for job in jobs:
        if name in (job.command, job.module):
            return job
    raise UserError(f"unknown job '{name}'; jobs: {', '.join(j.module for j in jobs)}")
