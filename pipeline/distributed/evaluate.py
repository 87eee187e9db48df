"""Evaluate driver: resolve the pretrained model, split by patient, train heads as Ray tasks, log Dice.

The pretrained backbone and the same architecture from random initialization run as two Ray tasks in
parallel (one CPU or GPU each); the driver logs ``dice_<organ>``/``dice_mean`` (pretrained) and
``random_init_dice_<organ>``/``random_init_dice_mean`` to one MLflow run tagged with the pretrain run id.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import EvaluateConfig, UserError
from pipeline.data.patches import load_volume_refs
from pipeline.evaluation.metrics import dice_mean, dice_table
from pipeline.evaluation.splits import holdout_split
from pipeline.labels import ORGANS


def _evaluate_task(model_path: str, random_init: bool, cfg_json: dict, data_dir: str,
                   train_ids: list[str], test_ids: list[str], coords_dir: str | None = None) -> dict:
    """Runs in a Ray task: everything it needs is passed by value or path."""
    import torch

    from pipeline.evaluation.downstream import evaluate_backbone
    from pipeline.train.checkpoint import load_pretrained

    torch.set_num_threads(1)
    cfg = EvaluateConfig.model_validate(cfg_json)
    backbone, pretrain_cfg = load_pretrained(model_path, random_init=random_init, seed=cfg.seed)
    refs = {r.item_id: r for r in load_volume_refs(data_dir, require_labels=True, coords_dir=coords_dir)}
    out = evaluate_backbone(backbone, pretrain_cfg, cfg, [refs[i] for i in train_ids],
                            [refs[i] for i in test_ids])
    return out


def resolve_model(cfg: EvaluateConfig, uri: str, workdir: Path) -> tuple[str, str | None]:
    """(path of model.pt, pretrain run id or None)."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise UserError(f"checkpoint '{cfg.checkpoint}' has no model.pt")
        return str(path.resolve()), cfg.pretrain_run_id
    if not cfg.pretrain_run_id:
        raise UserError("evaluate needs pretrain_run_id (an MLflow run of `anatdiff pretrain`) or checkpoint")
    tracking.get_run(uri, cfg.pretrain_run_id)
    local = tracking.download_artifacts(uri, cfg.pretrain_run_id, "model", workdir)
    return str(local / "model.pt"), cfg.pretrain_run_id


def mean_over_cases(per_case: dict[str, np.ndarray]) -> np.ndarray:
    """(13,) mean Dice per organ over cases, NaN where no case has the organ (empty-organ rule)."""
    stacked = np.stack(list(per_case.values()))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stacked, axis=0)


def _log_results(uri: str, run_id: str, rows: dict[str, dict], test_refs, workdir: Path) -> str:
    from pipeline.evaluation.report import dice_bar_chart, overlay_png

    means = {}
    for name, res in rows.items():
        prefix = "" if name == "pretrained" else "random_init_"
        per_organ = mean_over_cases(res["dice"])
        means[name] = per_organ
        metrics = {f"{prefix}dice_{organ}": v for organ, v in zip(ORGANS, per_organ)}
        metrics[f"{prefix}dice_mean"] = dice_mean(per_organ)
        tracking.log_metrics(uri, run_id, metrics)
        for case, d in res["dice"].items():
            tracking.log_metrics(uri, run_id, {f"{prefix}case_dice_mean.{case}": dice_mean(d)})
    table = dice_table({"pretrained" if k == "pretrained" else "random init": v for k, v in means.items()})
    (workdir / "dice_table.md").write_text(table + "\n")
    dice_bar_chart(means, workdir / "dice_per_organ.png")
    tracking.log_artifact(uri, run_id, workdir / "dice_table.md")
    tracking.log_artifact(uri, run_id, workdir / "dice_per_organ.png")
    for ref in test_refs[:2]:
        png = workdir / f"overlay_{ref.item_id}.png"
        overlay_png(np.asarray(ref.image()), np.asarray(ref.label()), rows["pretrained"]["pred"][ref.item_id], png)
        tracking.log_artifact(uri, run_id, png, "overlays")
    return table


def _guide_coords(model_path: str, data_dir: str, uri: str, workdir: Path, run_id: str) -> str | None:
    """For a backbone pretrained with the learned guide: its coordinate maps over the labelled data."""
    from pipeline.distributed.coords import ensure_coord_maps, resolve_guide
    from pipeline.train.checkpoint import load_pretrained

    _, pretrain_cfg = load_pretrained(model_path)
    if pretrain_cfg.model.guidance != "learned":
        return None
    bundled = Path(model_path).parent / "guide.pt"
    guide_file, guide_run = (bundled, None) if bundled.is_file() else \
        resolve_guide(pretrain_cfg.model.guide_checkpoint, uri, workdir)
    tracking.set_tags(uri, run_id, {"anatdiff.guide": pretrain_cfg.model.guide_checkpoint or "",
                                    "anatdiff.guide_run_id": guide_run or _run_of(pretrain_cfg.model.guide_checkpoint)})
    return str(ensure_coord_maps(data_dir, guide_file))


def _run_of(spec: str | None) -> str:
    return spec[len("runs:/"):].strip("/").split("/")[0] if spec and spec.startswith("runs:/") else ""


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Driver of the evaluate job. Returns the run id, the Dice table and per-organ means."""
    import ray

    from pipeline.distributed.runtime import init_ray

    data_dir = str(Path(cfg.data).resolve())
    refs = load_volume_refs(data_dir, require_labels=True)
    ids = [r.item_id for r in refs]
    keys = [r.patient_key if isinstance(r.patient_key, str) else None for r in refs]
    try:
        train_ids, test_ids = holdout_split(ids, keys, cfg.test_fraction, seed=cfg.seed)
    except ValueError as e:
        raise UserError(f"cannot split '{data_dir}' for evaluation: {e}") from None
    uri = tracking.connect(cfg.tracking.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path, pretrain_run = resolve_model(cfg, uri, workdir)
        tags = {"anatdiff.job": "evaluate", "anatdiff.protocol": cfg.protocol,
                "anatdiff.pretrain_run_id": pretrain_run or "", "anatdiff.checkpoint": model_path}
        if pretrain_run:
            guidance = tracking.get_run(uri, pretrain_run).data.tags.get("anatdiff.guidance", "")
            tags["anatdiff.guidance"] = guidance
        run_id = tracking.start_run(uri, cfg.tracking.experiment, f"evaluate-{cfg.protocol}", tags=tags)
        with tracking.run_status(uri, run_id):
            tracking.log_params(uri, run_id, cfg.model_dump(mode="json") | {
                "n_train": len(train_ids), "n_test": len(test_ids),
                "train_ids": ",".join(train_ids), "test_ids": ",".join(test_ids)})
            init_ray(cfg.num_cpus)
            coords_dir = _guide_coords(model_path, data_dir, uri, workdir, run_id)
            task = ray.remote(num_cpus=1)(_evaluate_task)
            variants = {"pretrained": False} | ({"random_init": True} if cfg.compare_random_init else {})
            futures = {name: task.remote(model_path, rnd, cfg.model_dump(mode="json"), data_dir,
                                         train_ids, test_ids, coords_dir) for name, rnd in variants.items()}
            rows = {name: ray.get(f) for name, f in futures.items()}
            by_id = {r.item_id: r for r in refs}
            table = _log_results(uri, run_id, rows, [by_id[i] for i in test_ids], workdir)
    means = {name: float(dice_mean(mean_over_cases(r["dice"])))
             for name, r in rows.items()}
    return {"run_id": run_id, "tracking_uri": uri, "table": table, "dice_mean": means,
            "test_ids": test_ids, "train_ids": train_ids}
