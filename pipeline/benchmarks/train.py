"""`anatdiff benchmark train`: Ray Train loop vs a plain PyTorch loop on the same model and data.

Figures (last line JSON): ``ray_train_overhead`` = plain steps/s over Ray steps/s, minus one (1 worker, 1
CPU thread each, steady state: the first log window is dropped); ``data_wait_fraction`` = share of step time
rank 0 spends waiting for its patches (and the objective's inputs: the Models Genesis corruption for
``restorative``, the second view for ``contrastive``) with 2 workers. Ray start-up time is reported separately.
``channels_last_speedup``: the plain loop with ``build_denoiser``'s channels_last weights over the same loop with
contiguous weights.
``objective`` picks the pretraining objective (default ``diffusion``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PretrainConfig, PreprocessConfig, SynthConfig, load_config


def _corpus(work: Path, n: int) -> Path:
    from pipeline.ingest.preprocess import preprocess_item
    from pipeline.ingest.manifest import write_manifest
    from pipeline.io.layouts import discover_items
    from pipeline.synth.corpus import synthesize_corpus

    synthesize_corpus(SynthConfig(out=str(work / "corpus"), n=n, seed=7, workers=1))
    pp = PreprocessConfig(input=str(work / "corpus"), output=str(work / "data"), log_to_mlflow=False)
    items, _ = discover_items(work / "corpus")
    write_manifest([preprocess_item(i, pp, work / "data") for i in items], work / "data")
    return work / "data"


def plain_steps_per_s(cfg: PretrainConfig, data: Path, steps: int, warmup: int = 5,
                      contiguous: bool = False) -> float:
    """The same step, model and patch stream in one process with one thread (what one Ray worker gets).
    ``contiguous``: the model's weights in the contiguous layout instead of ``build_denoiser``'s channels_last."""
    from pipeline.data.patches import PatchStream, load_volume_refs
    from pipeline.diffusion.schedules import DiffusionSchedule
    from pipeline.train.step import (add_objective_inputs, batch_to_tensors, build_training_model, ema_update,
                                     make_ema, train_step)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_training_model(cfg)
        if contiguous:
            model = model.to(memory_format=torch.contiguous_format)
        ema = make_ema(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
        schedule = DiffusionSchedule.from_config(cfg.diffusion)
        stream = PatchStream(load_volume_refs(data), cfg.patches.patch_size_zyx, cfg.patches.window_hu)
        t0 = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                t0 = time.perf_counter()
            batch = batch_to_tensors(add_objective_inputs(stream.batch(step, cfg.optim.batch_size), cfg, 0, step,
                                                          stream.refs), torch.device("cpu"))
            train_step(model, opt, batch, cfg, schedule, step)
            ema_update(ema, model, cfg.optim.ema_decay)
        return steps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def _ray_figures(cfg: PretrainConfig) -> dict[str, float]:
    from pipeline import tracking
    from pipeline.distributed.pretrain import run_pretrain

    t0 = time.perf_counter()
    out = run_pretrain(cfg)
    wall = time.perf_counter() - t0
    steady = {k: tracking.metric_values(out["tracking_uri"], out["run_id"], k)[1:]
              for k in ("steps_per_s", "data_wait_fraction")}
    return {"steps_per_s": float(np.mean(steady["steps_per_s"])),
            "data_wait_fraction": float(np.mean(steady["data_wait_fraction"])), "wall_s": wall}


def run(workdir: str | None = None, quick: bool = False, objective: str = "diffusion") -> dict:
    from pipeline.distributed.patch_dataset import local_ray

    steps = 30 if quick else 80
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        data = _corpus(work, 4 if quick else 6)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        base = load_config(PretrainConfig, "pretrain-tiny", {
            "data": str(data), "storage_path": str(work / "runs"), "registered_model": None, "sample_every": 0,
            "objective": objective,
            "optim": {"steps": steps + 10, "warmup_steps": 5}, "log_every": 10, "checkpoint_every": 10_000,
            "tracking": {"tracking_uri": uri}})
        plain = plain_steps_per_s(base, data, steps)
        with local_ray() as startup:
            one = _ray_figures(base.model_copy(update={"run_name": "bench-1w", "scaling": base.scaling.model_copy(
                update={"num_workers": 1})}))
            two = _ray_figures(base.model_copy(update={"run_name": "bench-2w", "scaling": base.scaling.model_copy(
                update={"num_workers": 2})}))
        plain_after = plain_steps_per_s(base, data, steps)  # bracket the Ray runs: load drifts on shared hosts
        plain_contiguous = plain_steps_per_s(base, data, steps, contiguous=True)
    plain = (plain + plain_after) / 2
    return {
        "ray_train_overhead": plain / one["steps_per_s"] - 1.0,
        "data_wait_fraction": two["data_wait_fraction"],
        "plain_steps_per_s": plain,
        "plain_steps_per_s_before_after": [2 * plain - plain_after, plain_after],
        "channels_last_speedup": plain_after / plain_contiguous,   # the two runs next to each other
        "plain_contiguous_steps_per_s": plain_contiguous,
        "ray_1worker_steps_per_s": one["steps_per_s"],
        "ray_2workers_steps_per_s": two["steps_per_s"],
        "ray_2workers_samples_per_s": two["steps_per_s"] * base.optim.batch_size * 2,
        "ray_1worker_wall_s": one["wall_s"],
        "ray_startup_s": startup,
        "steps_timed": steps,
        "batch_size": base.optim.batch_size,
        "patch_size_zyx": list(base.patches.patch_size_zyx),
        "device": "cpu",
        "objective": objective,
    }
