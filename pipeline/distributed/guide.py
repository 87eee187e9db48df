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
from pipeline.guide.crops import sample_crop_pair
from pipeline.guide.inference import load_guide, save_guide
from pipeline.guide.model import build_guide
from pipeline.guide.train import collate_pairs, guide_param_groups, guide_train_step
from pipeline.models.weights import load_plain
from pipeline.train.step import lr_at

GUIDE_FILE = "guide.pt"


def pair_batch(refs, cfg: GuideConfig, rank: int, step: int) -> tuple[dict, np.random.Generator]:
    """B crop pairs for (rank, step); the rng returned also draws the loss's sample points."""
    rng = np.random.default_rng([cfg.seed, rank, step])
    pairs = []
    for i in rng.choice(len(refs), size=cfg.optim.batch_size):
        ref = refs[i]
        pairs.append(sample_crop_pair(ref.image(), ref.spacing_zyx_mm, cfg.crop_size_zyx, rng,
                                      spacing_range_mm=cfg.spacing_range_mm, mask_zyx=ref.mask(),
                                      centre_box_zyx=ref.body_bbox_zyx(),
                                      scan_end_probability=cfg.scan_end_probability))
    return collate_pairs(pairs), rng


def train_loop_per_worker(config: dict) -> None:
    cfg = GuideConfig.model_validate(config["cfg"])
    uri, run_id = config["tracking_uri"], config["run_id"]
    rank, _, device = trainer.worker_context()
    torch.manual_seed(cfg.seed)
    model = build_guide(cfg.model).to(device)
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
    refs = load_volume_refs(config["data_dir"])
    autocast = torch.bfloat16 if device.type == "cuda" else None
    t_log = time.perf_counter()
    for step in range(start, cfg.optim.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.optim)
        batch, rng = pair_batch(refs, cfg, rank, step)
        batch = {k: v.to(device) if k == "image" else v for k, v in batch.items()}
        info = guide_train_step(ddp, optimizer, batch, cfg.n_points, rng, cfg.optim.grad_clip,
                                cfg.consistency_weight, cfg.body_fraction, cfg.frame, autocast)
        done = step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.optim.steps):
            info["steps_per_s"] = cfg.log_every / (time.perf_counter() - t_log)
            tracking.log_metrics(uri, run_id, info, step=done)
            t_log = time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == cfg.optim.steps:
            trainer.report(rank, {"step": done, "loss": info["loss"]}, lambda d: save(d, done))


def _score_and_log(cfg: GuideConfig, guide_file: Path, uri: str, run_id: str, workdir: Path) -> dict:
    from pipeline.guide.evaluation import coordinate_png, craniocaudal_check, score_frames

    guide = load_guide(guide_file)
    metrics: dict[str, float] = {}
    if cfg.eval_data:
        refs = load_volume_refs(cfg.eval_data, require_labels=True)
        metrics.update(score_frames(refs, guide))
        png = coordinate_png(refs[0], guide, workdir / f"coords_{refs[0].item_id}.png")
        tracking.log_artifact(uri, run_id, png, "coordinate_maps")
    if cfg.real_data:
        real = load_volume_refs(cfg.real_data)
        metrics.update(craniocaudal_check(real, guide))
        png = coordinate_png(real[0], guide, workdir / f"coords_{real[0].item_id}.png")
        tracking.log_artifact(uri, run_id, png, "coordinate_maps")
    tracking.log_metrics(uri, run_id, metrics, step=cfg.optim.steps)
    return metrics


def run_guide(cfg: GuideConfig) -> dict:
    """Driver: MLflow run, Ray TorchTrainer, guide.pt logged, scored when eval data is given."""
    from pipeline.distributed.runtime import init_ray

    data_dir = Path(cfg.data).resolve()
    refs = load_volume_refs(data_dir)
    for extra in (cfg.eval_data, cfg.real_data):
        if extra:
            load_volume_refs(extra)  # fail now, not after training
    uri = tracking.connect(cfg.tracking.tracking_uri)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.run_name,
                                tags={"anatdiff.job": "train-guide", "anatdiff.data": str(data_dir)},
                                resume_tag=("anatdiff.run_key",
                                            f"{trainer.storage_uri(cfg.storage_path)}/{cfg.run_name}"))
    tracking.log_params(uri, run_id, cfg.model_dump(mode="json") | {"n_volumes": len(refs)})
    init_ray(cfg.num_cpus)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "tracking_uri": uri, "run_id": run_id,
                   "data_dir": str(data_dir)}
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
