"""Ray Train V2 plumbing shared by the training jobs (pretrain, train-guide): the only Ray calls they make.

A job supplies a pure ``train_loop_per_worker`` that uses ``restore`` / ``report`` below; ``fit`` runs it
on a TorchTrainer. Rerunning with the same ``run_name`` and ``storage_path`` resumes from storage.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from pipeline.config import ScalingConfig as ScalingSpec


def worker_context() -> tuple[int, int, Any]:
    """(world rank, world size, torch device) of this training worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def prepare_model(model):
    """DDP-wrap (and move) the model the Ray Train way."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def restore(load: Callable[[Path], int]) -> int:
    """Call ``load(dir)`` on the latest checkpoint (after a worker restart or a rerun); returns its step."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(load(Path(d)))


def report(rank: int, metrics: dict, save: Callable[[Path], None]) -> None:
    """Every worker calls this at the same steps (a barrier); rank 0 saves and hands over a checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def all_agree(flag: bool) -> bool:
    """True on every worker if ``flag`` is True on any (an all-reduce of one number; workers must call it at
    the same steps). Without a process group (one process) it is ``flag`` itself."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def storage_uri(storage_path: str) -> str:
    """Absolute local folder, or a URI (s3://, gs://) unchanged."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def fit(train_loop: Callable[[dict], None], loop_config: dict, run_name: str, storage_path: str,
        scaling: ScalingSpec, max_failures: int):
    """Run ``train_loop`` on a TorchTrainer; returns Ray's Result (``.checkpoint`` is the latest)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_uri(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()
