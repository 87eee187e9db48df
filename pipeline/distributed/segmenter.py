"""`anatdiff train-segmenter` driver: train on every labelled case, save the segmenter, log and register it.

The training runs as one Ray task (``cpus`` CPUs, ``gpus`` GPUs) through the same functions as the evaluate
job (``pipeline.evaluation.downstream.fit_protocol``); the driver assembles the ``Segmenter`` (backbone, head,
the learned guide when there is one), writes its folder and logs it to MLflow twice: as plain files
(``segmenter/``, what `anatdiff predict` loads without unpickling) and as an ``mlflow.pytorch`` model with a
signature (``model``), registered as ``registered_model`` with ``alias``. Nothing derived from item ids or
paths reaches the run: the model card counts volumes and datasets.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import SegmenterConfig, UserError
from pipeline.data.patches import VolumeRef, load_volume_refs


def _refs(data_dirs: list[str], coords_dirs: list[str | None]) -> list[VolumeRef]:
    refs = []
    for d, c in zip(data_dirs, coords_dirs):
        refs += load_volume_refs(d, require_labels=True, coords_dir=c)
    ids = [r.item_id for r in refs]
    if len(set(ids)) != len(ids):
        raise UserError("the labelled folders share item ids: give each case once")
    return refs


def _split(refs: list[VolumeRef], val_cases: int) -> tuple[list[VolumeRef], list[VolumeRef]]:
    refs = sorted(refs, key=lambda r: r.item_id)
    if val_cases >= len(refs):
        raise UserError(f"val_cases={val_cases} leaves no training case of {len(refs)}; lower val_cases")
    return (refs[:len(refs) - val_cases], refs[len(refs) - val_cases:]) if val_cases else (refs, [])


def _train_task(model_path: str, cfg_json: dict, data_dirs: list[str], coords_dirs: list[str | None]) -> dict:
    """Runs in a Ray task; returns the trained weights (state dicts on the CPU) and the training record."""
    import torch

    from pipeline.distributed.evaluate import progress_printer
    from pipeline.evaluation.downstream import fit_protocol
    from pipeline.train.checkpoint import load_pretrained

    cfg = SegmenterConfig.model_validate(cfg_json)
    torch.set_num_threads(max(1, int(cfg.cpus)))
    device = "cuda" if cfg.gpus > 0 and torch.cuda.is_available() else "cpu"
    backbone, pretrain_cfg = load_pretrained(model_path, seed=cfg.seed)
    train, val = _split(_refs(data_dirs, coords_dirs), cfg.val_cases)
    result, _ = fit_protocol(backbone, pretrain_cfg, cfg.evaluate_config(), train, val or None, device,
                             progress=progress_printer("[segmenter]"))
    return {"head": _to_bytes(result.head), "backbone": _to_bytes(backbone) if cfg.protocol == "finetune" else None,
            "losses": result.losses, "val_dice": result.val_dice, "n_train": len(train), "n_val": len(val),
            "spacing_zyx_mm": train[0].spacing_zyx_mm}


def _to_bytes(module) -> bytes:
    """A module's state dict as ``torch.save`` bytes (plain across Ray's object store; read weights-only)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> dict:
    import io

    import torch

    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _body_threshold(data_dirs: list[str]) -> float:
    """The body-mask threshold preprocess used (its report.json), else its default -500 HU."""
    for d in data_dirs:
        report = Path(d) / "report.json"
        if report.is_file():
            value = json.loads(report.read_text()).get("config", {}).get("body_threshold_hu")
            if value is not None:
                return float(value)
    return -500.0


def build_segmenter(model_path: str, cfg: SegmenterConfig, out: dict, guide_file: Path | None, card: dict):
    """The ``Segmenter`` from the task's weights (and the frozen guide)."""
    from pipeline.evaluation.downstream import head_kind
    from pipeline.evaluation.heads import build_head
    from pipeline.evaluation.segmenter import Segmenter
    from pipeline.guide.inference import load_guide
    from pipeline.train.checkpoint import load_pretrained

    backbone, pretrain_cfg = load_pretrained(model_path)
    if out["backbone"] is not None:
        backbone.load_state_dict(_from_bytes(out["backbone"]))
    ecfg = cfg.evaluate_config()
    kind = head_kind(ecfg)
    n_t = len(cfg.feature_timesteps)
    head = build_head(kind, tuple(c * n_t for c in backbone.feature_channels), hidden=cfg.head.hidden,
                      feature_strides=backbone.feature_strides)
    head.load_state_dict(_from_bytes(out["head"]))
    guide = load_guide(guide_file) if guide_file is not None else None
    return Segmenter(backbone, pretrain_cfg, head, kind, cfg.head.hidden, cfg.feature_timesteps,
                     cfg.patch_size_zyx or pretrain_cfg.patches.patch_size_zyx, out["spacing_zyx_mm"],
                     _body_threshold(list(cfg.data)), cfg.sw_overlap, guide, cfg.seed, card,
                     cfg.island_fraction)


def run_train_segmenter(cfg: SegmenterConfig) -> dict:
    """Driver. Returns ``run_id``, ``tracking_uri``, ``model_uri`` (``models:/name@alias`` or ``runs:/``),
    ``version``, ``folder`` (a local copy of the segmenter folder is not kept: download it from the run)."""
    import ray

    from pipeline.distributed.coords import ensure_coord_maps
    from pipeline.distributed.evaluate import guide_file_of, resolve_model
    from pipeline.distributed.runtime import init_ray
    from pipeline.evaluation.segmenter import save_segmenter

    data_dirs = [str(Path(d).resolve()) for d in cfg.data]
    n_refs = len(_refs(data_dirs, [None] * len(data_dirs)))       # fails fast on a missing folder
    uri = tracking.connect(cfg.tracking.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path, pretrain_run = resolve_model(cfg, uri, workdir)
        run_id = tracking.start_run(uri, cfg.tracking.experiment, "train-segmenter", tags={
            "anatdiff.job": "train-segmenter", "anatdiff.protocol": cfg.protocol,
            "anatdiff.pretrain_run_id": pretrain_run or ""})
        with tracking.run_status(uri, run_id):
            tracking.log_params(uri, run_id, cfg.model_dump(mode="json", exclude={"data"}) |
                                {"n_volumes": n_refs, "n_datasets": len(data_dirs)})
            init_ray(cfg.num_cpus)
            guide_file = guide_file_of(model_path, uri, workdir, run_id)
            coords = [None if guide_file is None else str(ensure_coord_maps(d, guide_file)) for d in data_dirs]
            task = ray.remote(num_cpus=cfg.cpus, num_gpus=cfg.gpus)(_train_task)
            out = ray.get(task.remote(model_path, cfg.model_dump(mode="json"), data_dirs, coords))
            val = max((v for _, v in out["val_dice"]), default=float("nan"))
            tracking.log_metric_history(uri, run_id, "train_loss", out["losses"], range(1, len(out["losses"]) + 1))
            if out["val_dice"]:
                tracking.log_metrics(uri, run_id, {"val_dice_mean": val})
            card = {"training_data": f"{out['n_train']} labelled volumes from {len(data_dirs)} dataset(s)"
                                     + (f", {out['n_val']} kept for validation" if out["n_val"] else ""),
                    "protocol": cfg.protocol, "pretrain_run_id": pretrain_run or "(checkpoint file)",
                    "metrics": f"validation mean Dice {val:.3f}" if out["val_dice"] else
                               "none at training time: score it with `anatdiff evaluate` (k-fold or --test-data)"}
            segmenter = build_segmenter(model_path, cfg, out, guide_file, card)
            folder = save_segmenter(workdir / "segmenter", segmenter)
            tracking.log_artifacts(uri, run_id, folder, "segmenter")
            model_uri, version = tracking.log_segmenter_model(uri, run_id, segmenter, folder,
                                                              cfg.registered_model, cfg.alias)
    return {"run_id": run_id, "tracking_uri": uri, "model_uri": model_uri, "version": version,
            "val_dice_mean": val if out["val_dice"] else float("nan")}


def dice_on(segmenter, refs: list[VolumeRef]) -> dict[str, np.ndarray]:
    """Per-case Dice (13,) of a segmenter on preprocessed labelled volumes (the model grid)."""
    from pipeline.evaluation.metrics import dice_per_organ

    return {r.item_id: dice_per_organ(segmenter.predict_probs(np.asarray(r.image()), np.asarray(r.mask()) > 0)
                                      .argmax(0).astype(np.uint8), np.asarray(r.label())) for r in refs}
