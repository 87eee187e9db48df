"""Pretraining on Ray Train (V2): the driver and ``train_loop_per_worker``.

The Ray calls live in ``pipeline.distributed.trainer``; everything else is the pure step in ``pipeline.train``.
MLflow: the driver creates the run before workers start (an unreachable server fails here, before any
GPU is taken); rank 0 logs metrics by run id; the driver logs the final model as an artifact.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.config import PretrainConfig, UserError, dump_config
from pipeline.data.patches import PatchStream, load_volume_refs
from pipeline.diffusion.schedules import DiffusionSchedule
from pipeline.distributed import trainer
from pipeline.distributed.coords import ensure_coord_maps, resolve_guide
from pipeline.distributed.runtime import job_line
from pipeline.guide.inference import guide_kind
from pipeline.models.weights import unwrap
from pipeline.train.checkpoint import MODEL_FILE, load_pretrained, load_state, save_model, save_state
from pipeline.train.step import (add_objective_inputs, batch_to_tensors, build_model, build_training_model,
                                 ema_decay_at, ema_update, make_ema, train_step)


def _worker_setup(cfg: PretrainConfig):
    rank, world, device = trainer.worker_context()
    torch.manual_seed(cfg.seed)
    model = build_training_model(cfg).to(device)
    ema = make_ema(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def load(directory: Path) -> int:
        state = load_state(directory, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        return state["step"]

    start_step = trainer.restore(load)
    model = trainer.prepare_model(model)
    if cfg.compile:
        model = torch.compile(model)
    return rank, world, device, model, ema, optimizer, start_step


def _micro_batches(stream: PatchStream, cfg: PretrainConfig, rank: int, step: int, device) -> list[dict]:
    k = cfg.optim.grad_accum_steps
    return [batch_to_tensors(add_objective_inputs(stream.batch(step * k + i, cfg.optim.batch_size), cfg, rank,
                                                  step * k + i, stream.refs), device) for i in range(k)]


def _log_preview(ema, batch: dict, cfg: PretrainConfig, schedule, uri: str, run_id: str, step: int) -> None:
    from pipeline.train.preview import denoise_preview, save_preview_png

    ema.eval()
    with tempfile.TemporaryDirectory() as tmp:
        png = save_preview_png(denoise_preview(ema, batch, cfg, schedule),
                               Path(tmp) / f"ddim_step{step:07d}.png", f"step {step}: t=400 -> DDIM 20 steps")
        tracking.log_artifact(uri, run_id, png, "samples")


def _probe_setup(cfg: PretrainConfig):
    """(fit refs, score refs) of the online probe, or None when it is off."""
    if cfg.probe is None:
        return None
    from pipeline.evaluation.probe import split_probe_refs

    return split_probe_refs(load_volume_refs(cfg.probe.data, require_labels=True), cfg.probe)


def _run_probe(ema, cfg: PretrainConfig, probe_refs, step: int) -> dict[str, float]:
    from pipeline.evaluation.probe import probe_dice

    metrics = probe_dice(unwrap(ema), cfg, cfg.probe, *probe_refs, seed=cfg.seed)
    job_line(f"probe at step {step}: linear-head Dice {metrics['probe_dice_mean']:.3f} "
             f"({metrics['probe_organs_found']:.0f} organs > 0.2, {metrics['probe_seconds']:.0f} s)")
    return metrics


def _progress_line(step: int, cfg: PretrainConfig, loss: float, rate: float, elapsed: float) -> str:
    left = (cfg.optim.steps - step) / max(rate, 1e-9)
    if cfg.max_seconds is not None:
        left = min(left, max(cfg.max_seconds - elapsed, 0.0))
    return (f"pretrain step {step}/{cfg.optim.steps} loss {loss:.4f} {rate:.2f} steps/s "
            f"ETA {left / 60:.1f} min")


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: resume, stream patches, step, log (rank 0), probe, checkpoint."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    uri, run_id = config["tracking_uri"], config["run_id"]
    rank, world, device, model, ema, optimizer, start_step = _worker_setup(cfg)
    schedule = DiffusionSchedule.from_config(cfg.diffusion).to(device)
    stream = PatchStream(load_volume_refs(config["data_dir"], coords_dir=config["coords_dir"]),
                         cfg.patches.patch_size_zyx, cfg.patches.window_hu, seed=cfg.seed, rank=rank)
    probe_refs = _probe_setup(cfg) if rank == 0 else None
    autocast = torch.bfloat16 if device.type == "cuda" else None
    t_start = t_log = time.perf_counter()
    wait_s, samples, steps, probe_s = 0.0, 0, 0, 0.0
    for step in range(start_step, cfg.optim.steps):
        t0 = time.perf_counter()
        batches = _micro_batches(stream, cfg, rank, step, device)
        wait_s += time.perf_counter() - t0
        result = train_step(model, optimizer, batches, cfg, schedule, step, autocast)
        ema_update(ema, unwrap(model), ema_decay_at(step, cfg.optim.ema_decay))
        samples += cfg.optim.batch_size * cfg.optim.grad_accum_steps * world
        steps += 1
        done = step + 1
        elapsed = time.perf_counter() - t_start
        stop = cfg.max_seconds is not None and trainer.all_agree(elapsed >= cfg.max_seconds)
        last = stop or done == cfg.optim.steps
        if rank == 0 and (done % cfg.log_every == 0 or last):
            interval = time.perf_counter() - t_log
            metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                       "samples_per_s": samples / interval, "steps_per_s": steps / interval,
                       "data_wait_fraction": wait_s / interval}
            if device.type == "cuda":
                metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracking.log_metrics(uri, run_id, metrics, step=done)
            job_line(_progress_line(done, cfg, result.loss, steps / interval, elapsed))
            t_log, wait_s, samples, steps = time.perf_counter(), 0.0, 0, 0
        if rank == 0 and cfg.sample_every and cfg.objective == "diffusion" and done % cfg.sample_every == 0:
            _log_preview(ema, batches[0], cfg, schedule, uri, run_id, done)
        if probe_refs is not None and (done % cfg.probe.every == 0 or last):
            metrics = _run_probe(ema, cfg, probe_refs, done)
            probe_s += metrics["probe_seconds"]
            metrics["probe_time_fraction"] = probe_s / (time.perf_counter() - t_start)
            tracking.log_metrics(uri, run_id, metrics, step=done)
        if done % cfg.checkpoint_every == 0 or last:
            trainer.report(rank, {"step": done, "loss": result.loss},
                           lambda d: save_state(d, model, ema, optimizer, done, cfg))
        if stop:
            if rank == 0:
                job_line(f"pretrain: wall-clock limit of {cfg.max_seconds:.0f} s reached at step {done}; "
                         "that checkpoint is the final model")
            break


def run_pretrain(cfg: PretrainConfig, config_path: str | None = None) -> dict:
    """Driver: MLflow run, Ray TorchTrainer, final model logged. Returns run id and paths."""
    data_dir = Path(cfg.data).resolve()
    refs = load_volume_refs(data_dir)  # fails fast, before Ray starts, on a missing corpus
    uri = tracking.connect(cfg.tracking.tracking_uri)
    storage = trainer.storage_uri(cfg.storage_path)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.run_name,
                                tags={"anatdiff.job": "pretrain", "anatdiff.guidance": cfg.model.guidance,
                                      "anatdiff.objective": cfg.objective,
                                      "anatdiff.data": str(data_dir),
                                      "anatdiff.manifest_sha256": _file_sha256(data_dir / "manifest.parquet")},
                                resume_tag=("anatdiff.run_key", f"{storage}/{cfg.run_name}"))
    tracking.log_params(uri, run_id, cfg.model_dump(mode="json") | {"n_volumes": len(refs)})
    with tempfile.TemporaryDirectory(prefix="anatdiff-guide-") as cache:
        guide_file = _learned_guide(cfg, uri, run_id, Path(cache))
        if cfg.objective == "none":
            return _random_init_run(cfg, uri, run_id, guide_file)
        result = _train(cfg, uri, run_id, data_dir, guide_file)
    return {"run_id": run_id, "tracking_uri": uri, "checkpoint": result.checkpoint.path}


def _train(cfg: PretrainConfig, uri: str, run_id: str, data_dir: Path, guide_file: Path | None):
    """Ray Train fit, then the final model (+ the frozen guide) logged; returns the Ray Train result."""
    from pipeline.distributed.runtime import init_ray

    init_ray(cfg.num_cpus)
    coords_dir = None if guide_file is None else str(ensure_coord_maps(data_dir, guide_file))
    loop_config = {"cfg": cfg.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id,
                   "data_dir": str(data_dir), "coords_dir": coords_dir}
    with tracking.run_status(uri, run_id):
        result = trainer.fit(train_loop_per_worker, loop_config, cfg.run_name, cfg.storage_path,
                             cfg.scaling, cfg.max_failures)
        if result.checkpoint is None:
            raise UserError(f"pretraining '{cfg.run_name}' ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            _log_final_model(uri, run_id, Path(d) / MODEL_FILE, cfg, {"anatdiff.checkpoint": result.checkpoint.path},
                             guide_file)
    return result


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _learned_guide(cfg: PretrainConfig, uri: str, run_id: str, cache: Path) -> Path | None:
    """The frozen guide's file for ``guidance: learned``, downloaded under ``cache`` (the run logs it beside
    the model), else None."""
    if cfg.model.guidance != "learned":
        return None
    guide_file, guide_run = resolve_guide(cfg.model.guide_checkpoint, uri, cache)
    tracking.set_tags(uri, run_id, {"anatdiff.guide": cfg.model.guide_checkpoint,
                                    "anatdiff.guide_run_id": guide_run or "",
                                    "anatdiff.guide_kind": guide_kind(guide_file)})
    return guide_file


def _log_final_model(uri: str, run_id: str, model_file: Path, cfg: PretrainConfig, tags: dict,
                     guide_file: Path | None = None) -> None:
    """model.pt + config.yaml (+ the frozen guide.pt) under ``model/`` (what evaluate and export read), and
    the backbone as an ``mlflow.pytorch`` model ``backbone`` (the UNet3D with the final EMA weights, the same
    files as extra files), registered with alias ``final``: ``mlflow.pytorch.load_model(
    "models:/anatdiff-backbone@final")`` gives the module."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "config.yaml"
        dump_config(cfg, cfg_file)
        files = [model_file, cfg_file] + ([guide_file] if guide_file is not None else [])
        for f in files:
            tracking.log_artifact(uri, run_id, f, "model")
        backbone, _ = load_pretrained(model_file)
        _, version = tracking.log_torch_model(uri, run_id, backbone.eval(), "backbone", [str(f) for f in files],
                                              cfg.registered_model, "final")
    if version is not None:
        tags = tags | {"anatdiff.registered_model": f"{cfg.registered_model}/{version}"}
    tracking.set_tags(uri, run_id, tags)


def _random_init_run(cfg: PretrainConfig, uri: str, run_id: str, guide_file: Path | None) -> dict:
    """``objective: none``: the architecture with random weights, recorded like a trained run (no Ray)."""
    with tracking.run_status(uri, run_id), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(cfg.seed)
        model_file = Path(tmp) / MODEL_FILE
        save_model(model_file, build_model(cfg.model), cfg, step=0)
        _log_final_model(uri, run_id, model_file, cfg, {"anatdiff.checkpoint": "random-init"}, guide_file)
    return {"run_id": run_id, "tracking_uri": uri, "checkpoint": None}
