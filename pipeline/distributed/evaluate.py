"""Evaluate driver: resolve the pretrained model, split by patient, train each fold as a Ray task, log Dice.

Splits (``EvaluateConfig.split``): a patient-level ``holdout`` (one fold) or ``kfold`` cross-validation
(KFold over patients, shuffled, seed 42; ``val_cases`` validation patients per fold; ``train_cases`` for
label-efficiency curves). Every (fold, variant) pair, variant = pretrained weights or the same architecture
from random initialization, is one Ray task (1 CPU, ``gpus_per_task`` GPUs) training the protocol's head
(linear / nonlinear on frozen features, or finetune) and predicting the fold's test volumes whole.

MLflow: one parent run (tags ``anatdiff.job=evaluate``, ``anatdiff.pretrain_run_id``, ``anatdiff.protocol``)
with the mean and std across folds (``dice_<organ>``, ``dice_<organ>_std``, ``dice_mean``, ``dice_mean_std``,
``random_init_*``), the per-organ table (markdown, CSV), per-case Dice CSV, bar chart and overlays; with k
folds also one child run per fold (tag ``mlflow.parentRunId``) with that fold's Dice and loss curve.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import EvaluateConfig, UserError
from pipeline.data.patches import VolumeRef, content_names, in_content_order, load_volume_refs
from pipeline.evaluation.aggregate import (FoldSummary, mean_over_cases, per_case_csv, summarize_folds,
                                           summary_csv, summary_table)
from pipeline.evaluation.folds import evaluation_folds
from pipeline.evaluation.metrics import dice_mean
from pipeline.labels import ORGANS

VARIANT_PREFIX = {"pretrained": "", "random_init": "random_init_", "ceiling": "ceiling_"}
VARIANT_LABEL = {"pretrained": "pretrained", "random_init": "random init", "ceiling": "supervised ceiling"}


def fold_label(k: int, n_folds: int, variant: str, backbone_name: str | None = None) -> str:
    """Progress-line prefix of fold ``k`` (0-based) of ``variant``; ``backbone_name`` names the checkpoint's
    own row ("pretrained" by default)."""
    name = backbone_name if variant == "pretrained" and backbone_name else VARIANT_LABEL[variant]
    return f"[fold {k + 1}/{n_folds} {name}]"


def _fold_task(model_path: str, variant: str, cfg_json: dict, data_dirs: list[str], fold: dict[str, list[str]],
               coords_dirs: list[str | None], label: str = "") -> dict:
    """Runs in a Ray task: everything it needs is passed by value or path."""
    import torch

    from pipeline.evaluation.downstream import evaluate_backbone
    from pipeline.train.checkpoint import load_pretrained

    torch.set_num_threads(1)
    cfg = EvaluateConfig.model_validate(cfg_json)
    device = "cuda" if cfg.gpus_per_task > 0 and torch.cuda.is_available() else "cpu"
    backbone, pretrain_cfg = load_pretrained(model_path, random_init=variant != "pretrained", seed=cfg.seed,
                                             guidance=cfg.ceiling_guidance if variant == "ceiling" else None)
    refs = {r.item_id: r for d, c in zip(data_dirs, coords_dirs)
            for r in load_volume_refs(d, require_labels=True, coords_dir=c)}
    network = cfg.ceiling if variant == "ceiling" else cfg.finetune if cfg.protocol == "finetune" else None
    out = evaluate_backbone(backbone, pretrain_cfg, cfg, [refs[i] for i in fold["train"]],
                            [refs[i] for i in fold["test"]], [refs[i] for i in fold["val"]], device=device,
                            variant=variant, progress=progress_printer(label, limit_s=network and network.max_seconds))
    return out


def progress_printer(label: str, every_s: float = 20.0, limit_s: float | None = None):
    """A training progress callback printing one line (step, loss, steps/s, ETA) at most every ``every_s``; with
    ``limit_s`` (a wall-clock budget) the ETA is the sooner of the last step and the limit."""
    last = [0.0]

    def report(step: int, total: int, loss: float, seconds: float) -> None:
        if seconds - last[0] >= every_s or step == total:
            last[0] = seconds
            rate = step / max(seconds, 1e-9)
            eta = (total - step) / max(rate, 1e-9)
            if limit_s:
                eta = min(eta, max(limit_s - seconds, 0.0))
            print(f"      {label} step {step}/{total} loss {loss:.3f} {rate:.1f} steps/s ETA {eta:.0f} s",
                  flush=True)
    return report


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


def plan_folds(cfg: EvaluateConfig, refs: list[VolumeRef],
               test_refs: list[VolumeRef] | None = None) -> list[dict[str, list[str]]]:
    """The run's folds from the manifest's patient keys; a UserError says what to change if impossible.

    Items without a patient key are ordered by their volume's content (``VolumeRef.content_digest``), not by
    item id: keyed item ids change each time the same scans are preprocessed again, and the split must not.
    With ``test_refs`` (``cfg.test_data``, another dataset): one fold training on ``refs`` (the last
    ``val_cases`` patients validate, ``train_cases`` limits the rest) and testing on every case of ``test_refs``.
    """
    refs = in_content_order(refs)
    ids = content_names(refs)                        # split by these names, then map back to item ids
    item_of = {n: r.item_id for n, r in zip(ids, refs)}
    keys = [r.patient_key if isinstance(r.patient_key, str) else None for r in refs]
    if test_refs is not None:
        if {r.item_id for r in refs} & {r.item_id for r in test_refs}:
            raise UserError("data and test_data share item ids: the test set must be another dataset")
        test_ids = [r.item_id for r in in_content_order(test_refs)]
        folds = [_external_fold(cfg, ids, keys)]
    else:
        try:
            folds = evaluation_folds(ids, keys, cfg.split, cfg.folds, cfg.fold_seed, cfg.val_cases,
                                     cfg.train_cases, cfg.test_fraction, cfg.seed)
        except ValueError as e:
            raise UserError(f"cannot split '{cfg.data}' ({len(ids)} labelled items) for evaluation with "
                            f"split={cfg.split}, folds={cfg.folds}: {e}") from None
    folds = [{part: [item_of[n] for n in members] for part, members in fold.items()} for fold in folds]
    if test_refs is not None:
        folds[0]["test"] = test_ids
    return folds


def _external_fold(cfg: EvaluateConfig, ids: list[str], keys: list) -> dict[str, list[str]]:
    from pipeline.evaluation.folds import limit_patients, patient_of

    patients = sorted({patient_of(i, k) for i, k in zip(ids, keys)})
    if cfg.val_cases >= len(patients):
        raise UserError(f"val_cases={cfg.val_cases} leaves no training patient of {len(patients)} in '{cfg.data}'")
    val_patients = set(patients[len(patients) - cfg.val_cases:]) if cfg.val_cases else set()
    val = [i for i, k in zip(ids, keys) if patient_of(i, k) in val_patients]
    train_pairs = [(i, k) for i, k in zip(ids, keys) if patient_of(i, k) not in val_patients]
    train = [i for i, _ in train_pairs]
    if cfg.train_cases is not None:
        try:
            train = limit_patients(train, [k for _, k in train_pairs], cfg.train_cases, cfg.seed)
        except ValueError as e:
            raise UserError(f"train_cases: {e}") from None
    return {"train": train, "val": val, "test": []}


def guide_file_of(model_path: str, uri: str, workdir: Path, run_id: str) -> Path | None:
    """The frozen guide of a backbone pretrained with ``guidance: learned`` (bundled beside model.pt, else
    resolved from its config), tagged on ``run_id``; None for other guidance."""
    from pipeline.distributed.coords import resolve_guide
    from pipeline.train.checkpoint import load_pretrained

    _, pretrain_cfg = load_pretrained(model_path)
    if pretrain_cfg.model.guidance != "learned":
        return None
    bundled = Path(model_path).parent / "guide.pt"
    guide_file, guide_run = (bundled, None) if bundled.is_file() else \
        resolve_guide(pretrain_cfg.model.guide_checkpoint, uri, workdir)
    spec = pretrain_cfg.model.guide_checkpoint
    tracking.set_tags(uri, run_id, {"anatdiff.guide": spec or "",
                                    "anatdiff.guide_run_id": guide_run or tracking.run_id_of(spec) or ""})
    return guide_file


def _guide_coords(model_path: str, data_dir: str, uri: str, workdir: Path, run_id: str) -> str | None:
    """For a backbone pretrained with the learned guide: its coordinate maps over the labelled data."""
    from pipeline.distributed.coords import ensure_coord_maps

    guide_file = guide_file_of(model_path, uri, workdir, run_id)
    return None if guide_file is None else str(ensure_coord_maps(data_dir, guide_file))


def _fold_metrics(res: dict, prefix: str) -> dict[str, float]:
    per_organ = mean_over_cases(res["dice"])
    out = {f"{prefix}dice_{o}": float(v) for o, v in zip(ORGANS, per_organ)}
    out[f"{prefix}dice_mean"] = dice_mean(per_organ)
    out.update({f"{prefix}case_dice_mean.{case}": dice_mean(d) for case, d in res["dice"].items()})
    if res["val_dice"]:
        out[f"{prefix}val_dice_mean"] = max(v for _, v in res["val_dice"])
    if res["hd95"]:
        hd = mean_over_cases(res["hd95"])
        out.update({f"{prefix}hd95_{o}": float(v) for o, v in zip(ORGANS, hd)})
    out[f"{prefix}seconds"] = res["seconds"]
    return out


def _log_fold_child(uri: str, run_id: str, cfg: EvaluateConfig, k: int, fold: dict, results: dict) -> None:
    child = tracking.start_child_run(uri, run_id, f"fold-{k}", tags={
        "anatdiff.job": "evaluate-fold", "anatdiff.fold": str(k), "anatdiff.protocol": cfg.protocol})
    with tracking.run_status(uri, child):
        tracking.log_params(uri, child, {"fold": k, "n_train": len(fold["train"]), "n_val": len(fold["val"]),
                                         "n_test": len(fold["test"]), **{f"{s}_ids": ",".join(fold[s])
                                                                         for s in ("train", "val", "test")}})
        for name, res in results.items():
            tracking.log_metrics(uri, child, _fold_metrics(res, VARIANT_PREFIX[name]))
            _log_curves(uri, child, res, VARIANT_PREFIX[name])


def _log_curves(uri: str, run_id: str, res: dict, prefix: str) -> None:
    """The training loss and the validation Dice curve (``{prefix}val_dice`` at the checked steps)."""
    tracking.log_metric_history(uri, run_id, f"{prefix}train_loss", res["losses"], range(1, len(res["losses"]) + 1))
    if res["val_dice"]:
        steps, values = zip(*res["val_dice"])
        tracking.log_metric_history(uri, run_id, f"{prefix}val_dice", values, steps)


def _summaries(folds: list[dict], results: dict[tuple[int, str], dict], key: str = "dice") -> dict:
    names = sorted({n for _, n in results}, key=list(VARIANT_PREFIX).index)
    return {n: summarize_folds([mean_over_cases(results[(k, n)][key]) for k in range(len(folds))]) for n in names}


def _log_parent(uri: str, run_id: str, cfg: EvaluateConfig, folds: list[dict], results: dict,
                refs: dict[str, VolumeRef], workdir: Path) -> tuple[str, dict[str, FoldSummary]]:
    from pipeline.evaluation.report import dice_bar_chart, overlay_png

    summaries = _summaries(folds, results)
    for name, summary in summaries.items():
        tracking.log_metrics(uri, run_id, summary.metrics(VARIANT_PREFIX[name]))
        if cfg.hd95:
            tracking.log_metrics(uri, run_id, _summaries(folds, results, "hd95")[name].metrics(
                VARIANT_PREFIX[name], name="hd95"))
        per_case = {case: d for k in range(len(folds)) for case, d in results[(k, name)]["dice"].items()}
        tracking.log_metrics(uri, run_id, {f"{VARIANT_PREFIX[name]}case_dice_mean.{case}": dice_mean(d)
                                           for case, d in per_case.items()})
    columns = {VARIANT_LABEL[n]: s for n, s in summaries.items()}
    table = summary_table(columns, with_std=len(folds) > 1)
    files = {"dice_table.md": table, "dice_table.csv": summary_csv(columns),
             "dice_per_case.csv": per_case_csv([(k, case, d) for k in range(len(folds))
                                                for case, d in results[(k, "pretrained")]["dice"].items()])}
    for file, text in files.items():
        (workdir / file).write_text(text)
        tracking.log_artifact(uri, run_id, workdir / file)
    chart = dice_bar_chart({VARIANT_LABEL[n]: s.organ_mean for n, s in summaries.items()},
                           workdir / "dice_per_organ.png", title=f"Dice per organ ({cfg.protocol}, "
                           f"{len(folds)} fold{'s' if len(folds) > 1 else ''})")
    tracking.log_artifact(uri, run_id, chart)
    for case in folds[0]["test"][:cfg.overlays]:
        ref, png = refs[case], workdir / f"overlay_{case}.png"
        overlay_png(np.asarray(ref.image()), np.asarray(ref.label()), results[(0, "pretrained")]["pred"][case], png,
                    spacing_zyx_mm=ref.spacing_zyx_mm)
        tracking.log_artifact(uri, run_id, png, "overlays")
    return table, summaries


def _start_parent(cfg: EvaluateConfig, uri: str, model_path: str, pretrain_run: str | None,
                  folds: list[dict]) -> str:
    tags = {"anatdiff.job": "evaluate", "anatdiff.protocol": cfg.protocol,
            "anatdiff.split": "external" if cfg.test_data else cfg.split,
            "anatdiff.pretrain_run_id": pretrain_run or "", "anatdiff.checkpoint": model_path,
            "anatdiff.train_cases": str(cfg.train_cases or "all")}
    if pretrain_run:
        ptags = tracking.get_run(uri, pretrain_run).data.tags
        tags |= {f"anatdiff.{k}": ptags.get(f"anatdiff.{k}", "") for k in ("guidance", "objective")}
    name = f"evaluate-{cfg.protocol}" + (f"-{len(folds)}fold" if cfg.split == "kfold" else "")
    run_id = tracking.start_run(uri, cfg.tracking.experiment, name, tags=tags)
    params = cfg.model_dump(mode="json") | {"n_folds": len(folds)}
    if len(folds) == 1:
        params |= {"n_train": len(folds[0]["train"]), "n_test": len(folds[0]["test"]),
                   "train_ids": ",".join(folds[0]["train"]), "test_ids": ",".join(folds[0]["test"])}
    tracking.log_params(uri, run_id, params)
    return run_id


def run_evaluate(cfg: EvaluateConfig, backbone_name: str | None = None) -> dict:
    """Driver of the evaluate job. ``backbone_name``: what progress lines call the checkpoint's row (default
    "pretrained"; the study names its variant, e.g. "supervised ceiling").

    Returns ``run_id``, ``tracking_uri``, ``table`` (markdown), ``dice_mean`` {variant: mean across folds},
    ``dice_mean_std``, ``per_organ`` {variant: (13,) mean across folds}, ``folds`` (the splits),
    ``fold_run_ids``, and ``train_ids``/``test_ids`` (of the first fold; all test ids with k folds).
    """
    import ray

    from pipeline.distributed.runtime import init_ray

    data_dirs = [str(Path(d).resolve()) for d in (cfg.data, cfg.test_data) if d]
    refs = load_volume_refs(data_dirs[0], require_labels=True)
    test_refs = load_volume_refs(data_dirs[1], require_labels=True) if cfg.test_data else None
    folds = plan_folds(cfg, refs, test_refs)
    uri = tracking.connect(cfg.tracking.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path, pretrain_run = resolve_model(cfg, uri, workdir)
        run_id = _start_parent(cfg, uri, model_path, pretrain_run, folds)
        with tracking.run_status(uri, run_id):
            init_ray(cfg.num_cpus)
            coords_dirs = [_guide_coords(model_path, d, uri, workdir, run_id) for d in data_dirs]
            task = ray.remote(num_cpus=1, num_gpus=cfg.gpus_per_task)(_fold_task)
            variants = ["pretrained"] + (["random_init"] if cfg.compare_random_init else []) + \
                (["ceiling"] if cfg.ceiling is not None else [])
            cfg_json = cfg.model_dump(mode="json")
            futures = {(k, name): task.remote(model_path, name, cfg_json, data_dirs, fold, coords_dirs,
                                              fold_label(k, len(folds), name, backbone_name))
                       for k, fold in enumerate(folds) for name in variants}
            results = {key: ray.get(f) for key, f in futures.items()}
            if len(folds) > 1:
                for k, fold in enumerate(folds):
                    _log_fold_child(uri, run_id, cfg, k, fold, {n: results[(k, n)] for n in variants})
            else:
                for name in variants:
                    _log_curves(uri, run_id, results[(0, name)], VARIANT_PREFIX[name])
            table, summaries = _log_parent(uri, run_id, cfg, folds, results,
                                           {r.item_id: r for r in refs + (test_refs or [])}, workdir)
    return {"run_id": run_id, "tracking_uri": uri, "table": table,
            "dice_mean": {n: s.mean for n, s in summaries.items()},
            "dice_mean_std": {n: s.std for n, s in summaries.items()},
            "per_organ": {n: s.organ_mean for n, s in summaries.items()}, "folds": folds,
            "fold_run_ids": tracking_children(uri, run_id) if len(folds) > 1 else [],
            "train_ids": folds[0]["train"], "test_ids": [i for f in folds for i in f["test"]]}


def tracking_children(uri: str, run_id: str) -> list[str]:
    """Ids of the child (fold) runs of an evaluate run, fold order."""
    runs = tracking.find_runs(uri, f"tags.`mlflow.parentRunId` = '{run_id}'")
    return [r.info.run_id for r in sorted(runs, key=lambda r: int(r.data.tags.get("anatdiff.fold", 0)))]
