"""The demo workflow: each stage writes files the next one reads, exactly as the separate jobs do.

synth -> preprocess -> train-guide -> pretrain (online probe) -> evaluate (pretrained, random init, supervised
ceiling) -> train-segmenter (all labelled data, real abdomen included; registered) -> predict real scans.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.config import (DemoConfig, EvaluateConfig, GuideConfig, PredictConfig, PreprocessConfig,
                             PretrainConfig, SegmenterConfig, SynthConfig, deep_update, load_config)
from pipeline.labels import ORGANS

STAGES = 7


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.t0 = self.start

    def stage(self, n: int, title: str) -> None:
        print(f"\n[{n}/{STAGES}] {title}", flush=True)
        self.t0 = time.perf_counter()

    def done(self) -> None:
        print(f"      done in {time.perf_counter() - self.t0:.0f} s "
              f"({(time.perf_counter() - self.start) / 60:.1f} min so far)", flush=True)


def _synth_and_preprocess(cfg: DemoConfig, work: Path, clock: _Clock) -> dict[str, str]:
    from pipeline.distributed.ingest import run_preprocess
    from pipeline.ingest.manifest import summarize
    from pipeline.synth.corpus import synthesize_corpus

    clock.stage(1, f"synthesizing {cfg.n_unlabeled} unlabelled + {cfg.n_labeled} labelled (+ {cfg.n_probe} probe) "
                   f"CT phantoms in {work}")
    corpora = {"unlabeled": (cfg.n_unlabeled, cfg.seed, False), "labeled": (cfg.n_labeled, cfg.seed + 1000, True),
               "probe": (cfg.n_probe, cfg.seed + 2000, True)}
    sources = {}
    for name, (n, seed, labels) in corpora.items():
        if n:
            synth = SynthConfig(out=str(work / "corpus" / name), n=n, seed=seed, labels=labels)
            synthesize_corpus(synth)
            sources[name] = synth.out
    real = _project_path(cfg.real_ct) if cfg.real_ct else None
    if real is not None:
        sources["real"] = str(real)
        if (real / "abdomen_btcv").is_dir():
            sources["real_abdomen"] = str(real / "abdomen_btcv")
        if (real / "chest").is_dir() and cfg.guidance == "learned" and cfg.guide_real_share > 0:
            sources["real_chest"] = str(real / "chest")           # the guide's real unlabelled scans
    clock.done()

    clock.stage(2, "preprocessing with Ray Data (canonical orientation, resampling, body crop)")
    data = {}
    for name, source in sources.items():
        pp = PreprocessConfig(input=source, output=str(work / "data" / name),
                              target_spacing_zyx_mm=cfg.target_spacing_zyx_mm, tracking=cfg.tracking)
        print(f"      {name}: {summarize(run_preprocess(pp))}", flush=True)
        data[name] = pp.output
    clock.done()
    return data


def _train_guide(cfg: DemoConfig, work: Path, data: dict[str, str], stamp: str, clock: _Clock) -> str | None:
    from pipeline.distributed.guide import run_guide

    if cfg.guidance != "learned":
        print(f"\n[3/{STAGES}] guidance: {cfg.guidance}: no guide to train")
        return None
    clock.stage(3, "training the anatomical coordinate guide with Ray Train (self-supervised)")
    eval_data = [f"phantoms={data['labeled']}"]               # scored per dataset: phantoms, then the real abdomen
    if "real_abdomen" in data:
        eval_data.append(f"real_abdomen={data['real_abdomen']}")
    corpus = {"data": data["unlabeled"]}
    if "real_chest" in data:                                   # phantoms + real CT, crop pairs shared as configured
        corpus = {"data": [data["unlabeled"], data["real_chest"]],
                  "data_weights": [1 - cfg.guide_real_share, cfg.guide_real_share]}
    gc = load_config(GuideConfig, cfg.guide_preset, {
        **corpus, "eval_data": eval_data, "real_data": f"real={data['real']}" if "real" in data
        else None, "run_name": f"demo-guide-{stamp}", "storage_path": str(work / "runs"),
        "tracking": cfg.tracking.model_dump(), **cfg.guide})
    out = run_guide(gc)
    m = out["metrics"]
    for name in ("phantoms", "real_abdomen"):
        if f"guide_landmark_spread.{name}" in m:
            print(f"      landmark spread on {name.replace('_', ' ')} (lower is better): learned "
                  f"{m[f'guide_landmark_spread.{name}']:.3f}, body box {m[f'guide_landmark_spread_bodybox.{name}']:.3f}"
                  f", scanner {m[f'guide_landmark_spread_scanner.{name}']:.3f}")
    print(f"      MLflow run {out['run_id']}", flush=True)
    clock.done()
    return out["run_id"]


def _pretrain(cfg: DemoConfig, work: Path, data: dict[str, str], stamp: str, guide_run: str | None,
              clock: _Clock) -> dict:
    from pipeline.distributed.pretrain import run_pretrain

    without_probe = {k: v for k, v in cfg.pretrain.items() if k != "probe"}  # its data folder is added below
    pt_preview = load_config(PretrainConfig, cfg.pretrain_preset, deep_update({"data": data["unlabeled"]},
                                                                              without_probe))
    limit = f", at most {pt_preview.max_seconds / 60:.1f} min" if pt_preview.max_seconds else ""
    clock.stage(4, f"pretraining the diffusion model (guidance: {cfg.guidance}) with Ray Train{limit}")
    model = {"guidance": cfg.guidance}
    if guide_run:
        model["guide_checkpoint"] = f"runs:/{guide_run}"
    overrides = {"data": data["unlabeled"], "run_name": f"demo-{stamp}", "storage_path": str(work / "runs"),
                 "tracking": cfg.tracking.model_dump(), "model": model}
    if "probe" in data:
        overrides["probe"] = {"data": data["probe"], "every": max(pt_preview.optim.steps // 3, 1),
                              "fit_cases": cfg.n_probe - 1, "score_cases": 1}
    pretrain = run_pretrain(load_config(PretrainConfig, cfg.pretrain_preset, deep_update(overrides, cfg.pretrain)))
    print(f"      MLflow run {pretrain['run_id']}", flush=True)
    clock.done()
    return pretrain


def _segment_real_scans(cfg: DemoConfig, work: Path, data: dict[str, str], pretrain_run: str,
                        clock: _Clock) -> dict | None:
    """Train the segmenter on every labelled case (phantoms + the real abdomen), register it, predict."""
    from pipeline.distributed.predict import run_predict
    from pipeline.distributed.segmenter import run_train_segmenter

    if cfg.segmenter_preset is None:
        return None
    folders = [data["labeled"]] + ([data["real_abdomen"]] if "real_abdomen" in data else [])
    clock.stage(6, f"training the segmenter on all {len(folders)} labelled dataset(s), registering it in MLflow")
    sc = load_config(SegmenterConfig, cfg.segmenter_preset, deep_update({
        "data": folders, "pretrain_run_id": pretrain_run, "alias": "demo", "tracking": cfg.tracking.model_dump()},
        cfg.segmenter))
    seg = run_train_segmenter(sc)
    print(f"      {seg['model_uri']} (MLflow run {seg['run_id']})", flush=True)
    clock.done()
    real = _project_path(cfg.real_ct) if cfg.real_ct else None
    if real is None:
        return {"segmenter": seg}
    clock.stage(7, "predicting the real CT scans: label maps on each scan's own grid, organ volumes (mL)")
    out_dir = work / "predictions"
    run_predict(PredictConfig(model=seg["model_uri"], input=str(real), output=str(out_dir), tracking=cfg.tracking))
    _print_predictions(out_dir)
    clock.done()
    return {"segmenter": seg, "predictions": str(out_dir)}


def _print_predictions(out_dir: Path) -> None:
    import pandas as pd

    rows = pd.read_csv(out_dir / "predictions.csv")
    done = rows[rows["status"] == "predicted"]
    print(f"      {len(done)} of {len(rows)} inputs predicted; label maps, overlays and organ volumes in {out_dir}")
    dice_cols = [c for c in rows.columns if c.startswith("dice_") and c != "dice_note"]
    for _, r in done.iterrows():
        scores = r[dice_cols].astype(float) if dice_cols else None
        if scores is not None and scores.notna().any():
            print(f"      {r['item_id']}: mean Dice {np.nanmean(scores):.3f} against its reference label (a "
                  "training case of the segmenter: checks geometry and fit, not generalisation)")


def _verdict(evaluation: dict, ceiling_cfg=None) -> str:
    per = evaluation["per_organ"]
    pre, rnd = per["pretrained"], per.get("random_init")
    mean = lambda v: float(np.nanmean(v))  # noqa: E731
    lines = [f"pretrained non-linear head: mean Dice {mean(pre):.3f}, "
             f"{int(np.sum(np.nan_to_num(pre) > 0.2))} of {len(ORGANS)} organs above 0.2"]
    if rnd is not None:
        gap = mean(pre) - mean(rnd)
        lines.append(f"random init, same head: {mean(rnd):.3f} (pretraining {'+' if gap >= 0 else ''}{gap:.3f})")
    if "ceiling" in per:
        budget = ""
        if ceiling_cfg is not None:
            budget = (f", {ceiling_cfg.max_seconds / 60:.0f}-minute budget" if ceiling_cfg.max_seconds
                      else f", {ceiling_cfg.steps} steps")
        line = f"supervised ceiling (same network, all weights from scratch{budget}): {mean(per['ceiling']):.3f}"
        if mean(per["ceiling"]) < mean(pre):
            line += ("\n  (not converged: supervised training needs ~10 CPU-minutes to pass 0.4 here; docs/evaluation.md, "
                     "'Why nothing learned before')")
        lines.append(line)
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict:
    from pipeline.distributed.evaluate import run_evaluate

    work = Path(cfg.workdir).resolve()
    clock = _Clock()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = _synth_and_preprocess(cfg, work, clock)
    guide_run = _train_guide(cfg, work, data, stamp, clock)
    pretrain = _pretrain(cfg, work, data, stamp, guide_run, clock)

    clock.stage(5, "evaluating: non-linear head on frozen features, pretrained vs random init, and the supervised "
                   "ceiling")
    ev = load_config(EvaluateConfig, cfg.evaluate_preset, deep_update({
        "data": data["labeled"], "pretrain_run_id": pretrain["run_id"],
        "tracking": cfg.tracking.model_dump()}, cfg.evaluate))
    evaluation = run_evaluate(ev)
    clock.done()
    comparison = _compare(cfg, pretrain["run_id"], ev.protocol)
    segmenter = _segment_real_scans(cfg, work, data, pretrain["run_id"], clock)

    print(f"\nDice on held-out phantoms ({len(evaluation['test_ids'])} cases):\n")
    print(evaluation["table"])
    print(_verdict(evaluation, ev.ceiling))
    uri = evaluation["tracking_uri"]
    print(f"\nTotal {time.perf_counter() - clock.start:.0f} s. Runs are in MLflow at {uri}.")
    print(f"Open the UI with:  .venv/bin/mlflow ui --backend-store-uri {uri}")
    return {"guide_run": guide_run, "pretrain": pretrain, "evaluate": evaluation, "compare": comparison,
            "segmenter": segmenter}


def _compare(cfg: DemoConfig, pretrain_run_id: str, protocol: str) -> dict:
    """The comparison table across pretraining runs in this MLflow store (here: this demo's run)."""
    from pipeline.config import CompareConfig
    from pipeline.evaluation.compare import run_compare

    out = run_compare(CompareConfig(run_ids=(pretrain_run_id,), protocol=protocol, tracking=cfg.tracking))
    print(f"      comparison logged to MLflow run {out['run_id']} (anatdiff compare RUN_ID... adds more rows)")
    return out


def _project_path(path: str) -> Path | None:
    """``path`` as given, else relative to the project checkout (the demo may run from anywhere)."""
    for cand in (Path(path), Path(__file__).resolve().parents[2] / path):
        if cand.is_dir():
            return cand.resolve()
    print(f"      (no real CT at {path}: the real-CT stages are skipped)")
    return None
