"""The demo workflow: each stage writes files the next one reads, exactly as the separate jobs do."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import (DemoConfig, EvaluateConfig, GuideConfig, PreprocessConfig, PretrainConfig,
                             SynthConfig, deep_update, load_config)

STAGES = 5


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}/{STAGES}] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"      done in {time.perf_counter() - t0:.0f} s", flush=True)


def _synth_and_preprocess(cfg: DemoConfig, work: Path) -> dict[str, str]:
    from pipeline.distributed.ingest import run_preprocess
    from pipeline.ingest.manifest import summarize
    from pipeline.synth.corpus import synthesize_corpus

    t0 = _stage(1, f"synthesizing {cfg.n_unlabeled} unlabelled + {cfg.n_labeled} labelled CT phantoms in {work}")
    inputs = {"unlabeled": SynthConfig(out=str(work / "corpus" / "unlabeled"), n=cfg.n_unlabeled, seed=cfg.seed),
              "labeled": SynthConfig(out=str(work / "corpus" / "labeled"), n=cfg.n_labeled,
                                     seed=cfg.seed + 1000, labels=True)}
    for synth_cfg in inputs.values():
        synthesize_corpus(synth_cfg)
    sources = {name: c.out for name, c in inputs.items()}
    real = _project_path(cfg.real_ct) if cfg.real_ct else None
    if real is not None:
        sources["real"] = str(real)
    _done(t0)

    t0 = _stage(2, "preprocessing with Ray Data (canonical orientation, resampling, body crop)")
    data = {}
    for name, source in sources.items():
        pp = PreprocessConfig(input=source, output=str(work / "data" / name),
                              target_spacing_zyx_mm=cfg.target_spacing_zyx_mm, tracking=cfg.tracking)
        print(f"      {name}: {summarize(run_preprocess(pp))}", flush=True)
        data[name] = pp.output
    _done(t0)
    return data


def _train_guide(cfg: DemoConfig, work: Path, data: dict[str, str], stamp: str) -> str | None:
    from pipeline.distributed.guide import run_guide

    if cfg.guidance != "learned":
        print(f"\n[3/{STAGES}] guidance: {cfg.guidance}: no guide to train")
        return None
    t0 = _stage(3, "training the anatomical coordinate guide with Ray Train (self-supervised)")
    gc = load_config(GuideConfig, cfg.guide_preset, {
        "data": data["unlabeled"], "eval_data": data["labeled"], "real_data": data.get("real"),
        "run_name": f"demo-guide-{stamp}", "storage_path": str(work / "runs"),
        "tracking": cfg.tracking.model_dump(), **cfg.guide})
    out = run_guide(gc)
    m = out["metrics"]
    if "guide_landmark_spread" in m:
        print(f"      landmark spread (lower is better): learned {m['guide_landmark_spread']:.3f}, "
              f"body box {m['guide_landmark_spread_bodybox']:.3f}, scanner {m['guide_landmark_spread_scanner']:.3f}")
    print(f"      MLflow run {out['run_id']}", flush=True)
    _done(t0)
    return out["run_id"]


def run_demo(cfg: DemoConfig) -> dict:
    from pipeline.distributed.evaluate import run_evaluate
    from pipeline.distributed.pretrain import run_pretrain

    work = Path(cfg.workdir).resolve()
    t_start = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = _synth_and_preprocess(cfg, work)
    guide_run = _train_guide(cfg, work, data, stamp)

    t0 = _stage(4, f"pretraining the diffusion model (guidance: {cfg.guidance}) with Ray Train")
    model = {"guidance": cfg.guidance}
    if guide_run:
        model["guide_checkpoint"] = f"runs:/{guide_run}"
    overrides = {"data": data["unlabeled"], "run_name": f"demo-{stamp}", "storage_path": str(work / "runs"),
                 "tracking": cfg.tracking.model_dump(), "model": model}
    pt = load_config(PretrainConfig, cfg.pretrain_preset, deep_update(overrides, cfg.pretrain))
    pretrain = run_pretrain(pt)
    print(f"      MLflow run {pretrain['run_id']}", flush=True)
    _done(t0)

    t0 = _stage(5, "evaluating: non-linear head on frozen features, pretrained vs random init")
    ev = load_config(EvaluateConfig, cfg.evaluate_preset, deep_update({
        "data": data["labeled"], "pretrain_run_id": pretrain["run_id"],
        "tracking": cfg.tracking.model_dump()}, cfg.evaluate))
    evaluation = run_evaluate(ev)
    _done(t0)

    print("\nDice on held-out phantoms (" + ", ".join(evaluation["test_ids"]) + "):\n")
    print(evaluation["table"])
    comparison = _compare(cfg, pretrain["run_id"], ev.protocol)
    uri = evaluation["tracking_uri"]
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s. Runs are in MLflow at {uri}.")
    print(f"Open the UI with:  .venv/bin/mlflow ui --backend-store-uri {uri}")
    return {"guide_run": guide_run, "pretrain": pretrain, "evaluate": evaluation, "compare": comparison}


def _compare(cfg: DemoConfig, pretrain_run_id: str, protocol: str) -> dict:
    """The comparison table across pretraining runs in this MLflow store (here: this demo's run)."""
    from pipeline.config import CompareConfig
    from pipeline.evaluation.compare import run_compare

    out = run_compare(CompareConfig(run_ids=(pretrain_run_id,), protocol=protocol, tracking=cfg.tracking))
    print(f"\nComparison logged to MLflow run {out['run_id']} (anatdiff compare RUN_ID... adds more rows).")
    return out


def _project_path(path: str) -> Path | None:
    """``path`` as given, else relative to the project checkout (the demo may run from anywhere)."""
    for cand in (Path(path), Path(__file__).resolve().parents[2] / path):
        if cand.is_dir():
            return cand.resolve()
    print(f"      (no real CT at {path}: the guide's real-CT check is skipped)")
    return None

