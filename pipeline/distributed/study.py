"""The phantom study: five pretraining variants on one corpus and budget, every protocol, one comparison.

Variants (``StudyConfig.variants``): ``random_init`` (``objective: none``), ``restorative`` (Models Genesis),
``contrastive`` (vox2vec), ``unguided`` (diffusion, ``guidance: none``) and ``guided`` (diffusion with the
learned coordinate guide, trained first by ``run_guide``; ``guided_guidance: bodybox`` skips the guide). All
share the pretrain preset (same steps, batch, patches, model), the same unlabelled corpus and the same labelled
evaluation folds.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import (CompareConfig, EvaluateConfig, GuideConfig, PreprocessConfig, PretrainConfig,
                             StudyConfig, SynthConfig, deep_update, load_config)

#: variant -> pretrain overrides (the guided one gets its guidance from the config)
VARIANT_OVERRIDES = {"random_init": {"objective": "none"}, "restorative": {"objective": "restorative"},
                     "contrastive": {"objective": "contrastive"},
                     "unguided": {"objective": "diffusion", "model": {"guidance": "none"}},
                     "guided": {"objective": "diffusion"}}


def _log(msg: str, t0: float) -> None:
    print(f"[study {time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def _corpora(cfg: StudyConfig, work: Path) -> dict[str, str]:
    from pipeline.distributed.ingest import run_preprocess
    from pipeline.synth.corpus import synthesize_corpus

    data = {}
    for name, n, seed, labels in (("unlabeled", cfg.n_unlabeled, cfg.seed, False),
                                  ("labeled", cfg.n_labeled, cfg.seed + 1000, True)):
        synth = SynthConfig(out=str(work / "corpus" / name), n=n, seed=seed, labels=labels)
        if not (Path(synth.out) / ".done").is_file():
            synthesize_corpus(synth)
            (Path(synth.out) / ".done").write_text("ok\n")
        pp = PreprocessConfig(input=synth.out, output=str(work / "data" / name), num_cpus=cfg.num_cpus,
                              target_spacing_zyx_mm=cfg.target_spacing_zyx_mm, tracking=cfg.tracking)
        if not (Path(pp.output) / "manifest.parquet").is_file():
            run_preprocess(pp)
        data[name] = pp.output
    return data


def _guide(cfg: StudyConfig, work: Path, data: dict[str, str], stamp: str) -> str | None:
    from pipeline.distributed.guide import run_guide

    if "guided" not in cfg.variants or cfg.guided_guidance != "learned":
        return None
    gc = load_config(GuideConfig, cfg.guide_preset, deep_update({
        "data": data["unlabeled"], "eval_data": data["labeled"], "run_name": f"study-guide-{stamp}",
        "storage_path": str(work / "runs"), "num_cpus": cfg.num_cpus, "tracking": cfg.tracking.model_dump()},
        cfg.guide))
    return run_guide(gc)["run_id"]


def pretrain_overrides(cfg: StudyConfig, variant: str, data_dir: str, run_name: str, storage: str,
                       guide_run: str | None) -> dict:
    """The pretrain preset overrides of one variant (everything else: the shared budget)."""
    over = deep_update({"data": data_dir, "run_name": run_name, "storage_path": storage, "seed": cfg.seed,
                        "num_cpus": cfg.num_cpus, "tracking": cfg.tracking.model_dump()}, cfg.pretrain)
    over = deep_update(over, VARIANT_OVERRIDES[variant])
    if variant == "guided":
        model = {"guidance": cfg.guided_guidance}
        if cfg.guided_guidance == "learned":
            model["guide_checkpoint"] = f"runs:/{guide_run}"
        over = deep_update(over, {"model": model})
    return over


def run_study(cfg: StudyConfig) -> dict:
    """Synth + preprocess, (guide), pretrain every variant, evaluate every protocol, compare.

    Returns ``pretrain_runs`` {variant: run id}, ``evaluate_runs`` {(variant, protocol): run id},
    ``compare`` (the ``run_compare`` result), ``seconds`` per stage.
    """
    from pipeline.distributed.evaluate import run_evaluate
    from pipeline.distributed.pretrain import run_pretrain
    from pipeline.evaluation.compare import run_compare

    work, t0, stamp = Path(cfg.workdir).resolve(), time.perf_counter(), time.strftime("%Y%m%d-%H%M%S")
    seconds: dict[str, float] = {}
    data = _corpora(cfg, work)
    seconds["data"] = time.perf_counter() - t0
    _log(f"corpora ready in {work / 'data'}", t0)
    guide_run = _guide(cfg, work, data, stamp)
    seconds["guide"] = time.perf_counter() - t0 - sum(seconds.values())
    pretrain_runs, evaluate_runs = {}, {}
    for variant in cfg.variants:
        pt = load_config(PretrainConfig, cfg.pretrain_preset, pretrain_overrides(
            cfg, variant, data["unlabeled"], f"study-{stamp}-{variant}", str(work / "runs"), guide_run))
        pretrain_runs[variant] = run_pretrain(pt)["run_id"]
        _log(f"pretrained {variant}: run {pretrain_runs[variant]}", t0)
    seconds["pretrain"] = time.perf_counter() - t0 - sum(seconds.values())
    for variant, run_id in pretrain_runs.items():
        for protocol in cfg.protocols:
            ev = load_config(EvaluateConfig, cfg.evaluate_preset, deep_update({
                "data": data["labeled"], "pretrain_run_id": run_id, "protocol": protocol,
                "compare_random_init": False, "num_cpus": cfg.num_cpus, "tracking": cfg.tracking.model_dump()},
                cfg.evaluate))
            out = run_evaluate(ev)
            evaluate_runs[(variant, protocol)] = out["run_id"]
            _log(f"evaluated {variant} / {protocol}: dice_mean {out['dice_mean']['pretrained']:.3f} "
                 f"± {out['dice_mean_std']['pretrained']:.3f}", t0)
    seconds["evaluate"] = time.perf_counter() - t0 - sum(seconds.values())
    compare = run_compare(CompareConfig(run_ids=tuple(evaluate_runs.values()), name=f"study-{stamp}",
                                        tracking=cfg.tracking))
    seconds["total"] = time.perf_counter() - t0
    _log(f"done; comparison run {compare['run_id']}", t0)
    return {"pretrain_runs": pretrain_runs, "evaluate_runs": evaluate_runs, "guide_run": guide_run,
            "compare": compare, "seconds": seconds}
