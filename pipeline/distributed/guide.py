"""`anatdiff train-guide` on Ray Train: the self-supervised coordinate guide, then its landmark score.

Same shape as pretraining: the driver opens the MLflow run, workers train (``pipeline.guide.train``), rank 0
logs and checkpoints, the driver logs ``guide/guide.pt``, the three landmark-spread statistics, the real-CT
sanity check and PNG slices of the coordinate maps.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from pipeline.config import GuideConfig, UserError, dump_config
from pipeline.data.patches import load_volume_refs
from pipeline.distributed import trainer
from pipeline.distributed.runtime import job_line
from pipeline.guide.bpr import build_bpr, sample_slice_set
from pipeline.guide.crops import sample_crop_pair
from pipeline.guide.inference import load_guide, save_guide
from pipeline.guide.model import build_guide
from pipeline.guide.train import bpr_train_step, collate_pairs, guide_param_groups, guide_train_step
from pipeline.models.weights import load_plain
from pipeline.train.step import lr_at

GUIDE_FILE = "guide.pt"


def load_corpus(cfg: GuideConfig) -> tuple[list, np.ndarray]:
    """The training volumes of every ``data`` folder and each one's chance of being drawn: folder f gets
    ``data_weights[f]`` of the draws (None: in proportion to its volumes), shared equally by its volumes."""
    folders = [load_volume_refs(Path(d).resolve()) for d in cfg.data_folders()]
    weights = cfg.data_weights or [len(refs) for refs in folders]
    refs = [r for f in folders for r in f]
    prob = np.concatenate([np.full(len(f), w / len(f)) for f, w in zip(folders, weights)])
    return refs, prob / prob.sum()


def pair_batch(refs, prob, cfg: GuideConfig, rank: int, step: int) -> tuple[dict, np.random.Generator]:
    """B training samples for (rank, step): crop pairs (``coords``) or slice sets (``bpr``); the rng returned
    also draws the loss's sample points."""
    rng = np.random.default_rng([cfg.seed, rank, step])
    augment = cfg.augment.model_dump()
    samples = []
    for i in rng.choice(len(refs), size=cfg.optim.batch_size, p=prob):
        ref = refs[i]
        if cfg.kind == "bpr":
            samples.append(sample_slice_set(ref.image(), ref.spacing_zyx_mm, ref.body_bbox_zyx(), cfg.bpr_slices,
                                            cfg.bpr_slice_size, rng, augment, cfg.bpr_min_view_fraction))
            continue
        samples.append(sample_crop_pair(ref.image(), ref.spacing_zyx_mm, cfg.crop_size_zyx, rng,
                                        spacing_range_mm=cfg.spacing_range_mm, mask_zyx=ref.mask(),
                                        centre_box_zyx=ref.body_bbox_zyx(),
                                        max_shift_fraction=cfg.max_shift_fraction,
                                        scan_end_probability=cfg.scan_end_probability, augment_params=augment))
    if cfg.kind == "bpr":
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("image", "z_mm")}, rng
    return collate_pairs(samples), rng


def _step(cfg: GuideConfig, ddp, optimizer, batch, rng, autocast) -> dict:
    """One optimizer step of the configured guide kind; info as ``guide_train_step``."""
    if cfg.kind == "coords":
        return guide_train_step(ddp, optimizer, batch, cfg.n_points, rng, cfg.optim.grad_clip,
                                cfg.consistency_weight, cfg.body_fraction, cfg.frame, autocast)
    return bpr_train_step(ddp, optimizer, batch, cfg.optim.grad_clip, cfg.consistency_weight, autocast)


def train_loop_per_worker(config: dict) -> None:
    cfg = GuideConfig.model_validate(config["cfg"])
    uri, run_id = config["tracking_uri"], config["run_id"]
    rank, _, device = trainer.worker_context()
    torch.manual_seed(cfg.seed)
    model = (build_bpr(cfg) if cfg.kind == "bpr" else build_guide(cfg.model)).to(device)
    optimizer = torch.optim.AdamW(guide_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)

    def load(directory: Path) -> int:
        state = load_plain(directory / "state.pt", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return state["step"]

    def save(directory: Path, step: int) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                   directory / "state.pt")
        save_guide(directory / GUIDE_FILE, model, {"step": step, "config": cfg.model_dump(mode="json")})

    start = trainer.restore(load)
    ddp = trainer.prepare_model(model)
    refs, prob = load_corpus(cfg)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    t_log = t_start = t_line = time.perf_counter()
    for step in range(start, cfg.optim.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.optim)
        batch, rng = pair_batch(refs, prob, cfg, rank, step)
        batch = {k: v.to(device) if k == "image" else v for k, v in batch.items()}
        info = _step(cfg, ddp, optimizer, batch, rng, autocast)
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.optim.steps):
            info["steps_per_s"] = cfg.log_every / (time.perf_counter() - t_log)
            tracking.log_metrics(uri, run_id, info, step=done)
            t_log = time.perf_counter()
            if t_log - t_line >= 20 or done == cfg.optim.steps:  # one terminal line per ~20 s
                rate = (done - start) / (t_log - t_start)
                job_line(f"guide step {done}/{cfg.optim.steps} loss {info['loss']:.4f} {rate:.2f} steps/s "
                         f"ETA {(cfg.optim.steps - done) / max(rate, 1e-9) / 60:.1f} min")
                t_line = t_log
        if done % cfg.checkpoint_every == 0 or done == cfg.optim.steps:
            trainer.report(rank, {"step": done, "loss": info["loss"]}, lambda d: save(d, done))


def _score_and_log(cfg: GuideConfig, guide_file: Path, uri: str, run_id: str, workdir: Path) -> dict:
    """Every labelled dataset: landmark statistics and consistency (``.NAME`` suffixes; the first also
    without); every real dataset: cranio-caudal check and consistency. Coordinate PNGs of each first scan."""
    from pipeline.guide.evaluation import consistency_scores, coordinate_png, craniocaudal_check, score_frames

    guide = load_guide(guide_file)
    metrics: dict[str, float] = {}
    for i, (name, folder) in enumerate(cfg.named_folders("eval_data").items()):
        refs = load_volume_refs(folder, require_labels=True)
        scores = score_frames(refs, guide)
        scores.update(consistency_scores(refs, guide, cfg.consistency_views, cfg.seed))
        metrics.update({f"{k}.{name}": v for k, v in scores.items()})
        if i == 0:
            metrics.update(scores)
        png = coordinate_png(refs[0], guide, workdir / f"coords_{name}.png")
        tracking.log_artifact(uri, run_id, png, "coordinate_maps")
    for name, folder in cfg.named_folders("real_data").items():
        real = load_volume_refs(folder)
        metrics.update(craniocaudal_check(real, guide))
        metrics.update(consistency_scores(real, guide, cfg.consistency_views, cfg.seed, name))
        png = coordinate_png(real[0], guide, workdir / f"coords_{name}.png")
        tracking.log_artifact(uri, run_id, png, "coordinate_maps")
    tracking.log_metrics(uri, run_id, metrics, step=cfg.optim.steps)
    return metrics


def run_guide(cfg: GuideConfig) -> dict:
    """Driver: MLflow run, Ray TorchTrainer, guide.pt logged, scored when eval data is given."""
    from pipeline.distributed.runtime import init_ray

    cfg = cfg.model_copy(update={"data": tuple(str(Path(d).resolve()) for d in cfg.data_folders())})
    refs, _ = load_corpus(cfg)
    data_dir = Path(cfg.data_folders()[0]).resolve()
    for name, folder in cfg.named_folders("eval_data").items():   # fail now, not after training
        load_volume_refs(folder, require_labels=True)
    for name, folder in cfg.named_folders("real_data").items():
        load_volume_refs(folder)
    uri = tracking.connect(cfg.tracking.tracking_uri)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.run_name,
                                tags={"anatdiff.job": "train-guide", "anatdiff.data": str(data_dir),
                                      "anatdiff.guide_kind": cfg.kind},
                                resume_tag=("anatdiff.run_key",
                                            f"{trainer.storage_uri(cfg.storage_path)}/{cfg.run_name}"))
    tracking.log_params(uri, run_id, cfg.model_dump(mode="json") | {"n_volumes": len(refs)})
    init_ray(cfg.num_cpus)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id}
    with tracking.run_status(uri, run_id), tempfile.TemporaryDirectory() as tmp:
        result = trainer.fit(train_loop_per_worker, loop_config, cfg.run_name, cfg.storage_path, cfg.scaling,
                             cfg.max_failures)
        if result.checkpoint is None:
            raise UserError(f"guide training '{cfg.run_name}' ended without a checkpoint")
        with result.checkpoint.as_directory() as d:
            guide_file = Path(tmp) / GUIDE_FILE
            guide_file.write_bytes((Path(d) / GUIDE_FILE).read_bytes())
        cfg_file = Path(tmp) / "config.yaml"
        dump_config(cfg, cfg_file)
        tracking.log_artifact(uri, run_id, guide_file, "guide")
        tracking.log_artifact(uri, run_id, cfg_file, "guide")
        metrics = _score_and_log(cfg, guide_file, uri, run_id, Path(tmp))
        tracking.set_tags(uri, run_id, {"anatdiff.checkpoint": result.checkpoint.path})
    return {"run_id": run_id, "tracking_uri": uri, "checkpoint": result.checkpoint.path, "metrics": metrics}
