"""The demo workflow: each stage writes files the next one reads, exactly as the separate jobs do."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import (DemoConfig, EvaluateConfig, PreprocessConfig, PretrainConfig, SynthConfig,
                             load_config)


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}/4] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"      done in {time.perf_counter() - t0:.0f} s", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    from pipeline.distributed.evaluate import run_evaluate
    from pipeline.distributed.ingest import run_preprocess
    from pipeline.distributed.pretrain import run_pretrain
    from pipeline.ingest.manifest import summarize
    from pipeline.synth.corpus import synthesize_corpus

    work = Path(cfg.workdir).resolve()
    t_start = time.perf_counter()
    t0 = _stage(1, f"synthesizing {cfg.n_unlabeled} unlabelled + {cfg.n_labeled} labelled CT phantoms in {work}")
    corpus = {"unlabeled": SynthConfig(out=str(work / "corpus" / "unlabeled"), n=cfg.n_unlabeled, seed=cfg.seed),
              "labeled": SynthConfig(out=str(work / "corpus" / "labeled"), n=cfg.n_labeled,
                                     seed=cfg.seed + 1000, labels=True)}
    for synth_cfg in corpus.values():
        synthesize_corpus(synth_cfg)
    _done(t0)

    t0 = _stage(2, "preprocessing with Ray Data (canonical orientation, resampling, body crop)")
    data = {}
    for name, synth_cfg in corpus.items():
        pp = PreprocessConfig(input=synth_cfg.out, output=str(work / "data" / name),
                              target_spacing_zyx_mm=cfg.target_spacing_zyx_mm, tracking=cfg.tracking)
        print(f"      {name}: {summarize(run_preprocess(pp))}", flush=True)
        data[name] = pp.output
    _done(t0)

    t0 = _stage(3, "pretraining the guided diffusion model with Ray Train")
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    pt = load_config(PretrainConfig, cfg.pretrain_preset, {
        "data": data["unlabeled"], "run_name": run_name, "storage_path": str(work / "runs"),
        "tracking": cfg.tracking.model_dump(), **cfg.pretrain})
    pretrain = run_pretrain(pt)
    print(f"      MLflow run {pretrain['run_id']}", flush=True)
    _done(t0)

    t0 = _stage(4, "evaluating: head on frozen features, pretrained vs random init")
    ev = load_config(EvaluateConfig, cfg.evaluate_preset, {
        "data": data["labeled"], "pretrain_run_id": pretrain["run_id"],
        "tracking": cfg.tracking.model_dump(), **cfg.evaluate})
    evaluation = run_evaluate(ev)
    _done(t0)

    print("\nDice on held-out phantoms (" + ", ".join(evaluation["test_ids"]) + "):\n")
    print(evaluation["table"])
    uri = evaluation["tracking_uri"]
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s. Runs are in MLflow at {uri}.")
    print(f"Open the UI with:  .venv/bin/mlflow ui --backend-store-uri {uri}")
    return {"pretrain": pretrain, "evaluate": evaluation}
