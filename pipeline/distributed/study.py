"""The phantom study: pretraining variants on one corpus and budget, every protocol and label budget, and the
supervised ceiling; one table, one label-efficiency plot, one JSON line.

Variants (``StudyConfig.variants``): ``random_init`` (``objective: none``), ``restorative`` (Models Genesis),
``contrastive`` (vox2vec), ``unguided`` (diffusion, ``guidance: none``), ``guided_bodybox``, ``guided_learned`` and
``guided_bpr`` (diffusion guided by body-box coordinates, by the learned 3-D coordinate guide, or by a body-part
regression guide: each learned guide trained first by ``run_guide`` from the guide preset). All share
the pretrain preset (same budget, batch, patches, model), the unlabelled corpus and the labelled folds. The
ceiling is a random-init network of the same architecture with all weights trained (the finetune protocol with
``StudyConfig.ceiling`` settings; ``StudyConfig.ceiling_steps`` sets its steps per label budget; its coordinate
input is the evaluate preset's ``ceiling_guidance``), at every label budget. Frozen-feature
banks are cached per volume and backbone (``workdir/banks``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.config import (CompareConfig, EvaluateConfig, GuideConfig, PreprocessConfig, PretrainConfig,
                             StudyConfig, SynthConfig, deep_update, load_config)

#: variant -> pretrain overrides (the learned guide's checkpoint is added when it is trained)
VARIANT_OVERRIDES = {"random_init": {"objective": "none"}, "restorative": {"objective": "restorative"},
                     "contrastive": {"objective": "contrastive"},
                     "unguided": {"objective": "diffusion", "model": {"guidance": "none"}},
                     "guided_bodybox": {"objective": "diffusion", "model": {"guidance": "bodybox"}},
                     "guided_learned": {"objective": "diffusion", "model": {"guidance": "learned"}},
                     "guided_bpr": {"objective": "diffusion", "model": {"guidance": "learned"}}}

#: variant -> the kind of learned guide it is pretrained with (trained by ``_guides`` before any pretraining)
GUIDE_KINDS = {"guided_learned": "coords", "guided_bpr": "bpr"}


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


def guide_overrides(cfg: StudyConfig, kind: str, data: dict[str, str], run_name: str, storage: str) -> dict:
    """The guide preset overrides for the learned guide of ``kind`` ("coords" or "bpr"): the study's corpora,
    scored on the labelled phantoms, then ``cfg.guide``."""
    return deep_update({"kind": kind, "data": data["unlabeled"], "eval_data": data["labeled"], "run_name": run_name,
                        "storage_path": storage, "num_cpus": cfg.num_cpus, "tracking": cfg.tracking.model_dump()},
                       cfg.guide)


def _guides(cfg: StudyConfig, work: Path, data: dict[str, str], stamp: str, t0: float) -> dict[str, str]:
    """Train the learned guide of every guided variant in ``cfg.variants``; {variant: guide run id}."""
    from pipeline.distributed.guide import run_guide

    runs = {}
    for variant, kind in GUIDE_KINDS.items():
        if variant in cfg.variants:
            suffix = "" if kind == "coords" else f"-{kind}"
            gc = load_config(GuideConfig, cfg.guide_preset, guide_overrides(
                cfg, kind, data, f"study-guide{suffix}-{stamp}", str(work / "runs")))
            runs[variant] = run_guide(gc)["run_id"]
            _log(f"trained the {kind} guide for {variant}: run {runs[variant]}", t0)
    return runs


def pretrain_overrides(cfg: StudyConfig, variant: str, data_dir: str, run_name: str, storage: str,
                       guide_runs: dict[str, str] | None) -> dict:
    """The pretrain preset overrides of one variant (everything else: the shared budget); ``guide_runs``
    {variant: guide run id} for the guided variants."""
    over = deep_update({"data": data_dir, "run_name": run_name, "storage_path": storage, "seed": cfg.seed,
                        "num_cpus": cfg.num_cpus, "tracking": cfg.tracking.model_dump()}, cfg.pretrain)
    if variant == "ceiling":             # the random-init network the ceiling trains, with its coordinate input
        guidance = _evaluate_preset(cfg).ceiling_guidance
        return deep_update(over, {"objective": "none", **({"model": {"guidance": guidance}} if guidance else {})})
    over = deep_update(over, VARIANT_OVERRIDES[variant])
    if variant in GUIDE_KINDS:
        over = deep_update(over, {"model": {"guide_checkpoint": f"runs:/{(guide_runs or {})[variant]}"}})
    return over


def _evaluate_preset(cfg: StudyConfig) -> EvaluateConfig:
    return load_config(EvaluateConfig, cfg.evaluate_preset, deep_update({"data": "x"}, cfg.evaluate))


def ceiling_settings(cfg: StudyConfig, budget) -> dict:
    """The ceiling's training settings at label budget ``budget``: the evaluate preset's finetune settings, then
    ``cfg.ceiling``, then the budget's steps from ``cfg.ceiling_steps``."""
    preset = _evaluate_preset(cfg)
    settings = deep_update(preset.finetune.model_dump(mode="json"), cfg.ceiling or {})
    if budget in cfg.ceiling_steps:
        settings["steps"] = cfg.ceiling_steps[budget]
    return settings


def _evaluate(cfg: StudyConfig, data: str, work: Path, variant: str, pretrain_run: str, protocol: str, budget,
              extra: dict | None = None):
    from pipeline.distributed.evaluate import run_evaluate
    from pipeline.evaluation.study_report import VARIANT_NAMES, StudyRow

    over = deep_update({"data": data, "pretrain_run_id": pretrain_run, "protocol": protocol,
                        "train_cases": None if budget == "all" else budget, "compare_random_init": False,
                        "ceiling": None, "bank_cache": _bank_cache(cfg, work), "num_cpus": cfg.num_cpus,
                        "tracking": cfg.tracking.model_dump()}, cfg.evaluate)
    ev = load_config(EvaluateConfig, cfg.evaluate_preset, deep_update(over, extra or {}))
    out = run_evaluate(ev, backbone_name=VARIANT_NAMES[variant])
    n_train = float(np.mean([len(f["train"]) for f in out["folds"]]))
    return StudyRow(protocol, "", budget, out["dice_mean"]["pretrained"], out["dice_mean_std"]["pretrained"],
                    out["run_id"], n_train)


def evaluation_eta(took: list[float], steps: list[int]) -> str:
    """What is left of the evaluation stage, for the progress line. ``took``: seconds of the jobs done so far;
    ``steps``: for every job, its ceiling training steps (0 for a frozen-feature evaluation). Frozen-feature
    jobs are timed by their mean so far; ceiling jobs by seconds per step once one has run, and are named
    rather than guessed before that (a ceiling step trains the whole network and costs far more)."""
    done, todo = len(took), steps[len(took):]
    frozen = [t for t, s in zip(took, steps) if s == 0]
    ceiling_s, ceiling_steps = sum(t for t, s in zip(took, steps) if s), sum(s for s in steps[:done] if s)
    left = sum(1 for s in todo if s == 0) * (float(np.mean(frozen)) if frozen else 0.0)
    ceiling_left = sum(todo)
    if ceiling_left and ceiling_steps:
        left += ceiling_s / ceiling_steps * ceiling_left
    elif ceiling_left:
        if not frozen:
            return f"evaluation ETA unknown: the ceiling's {ceiling_left} steps are next"
        return f"evaluation ETA {left / 60:.0f} min, then the ceiling's {ceiling_left} steps"
    return f"evaluation ETA {left / 60:.0f} min"


def _bank_cache(cfg: StudyConfig, work: Path) -> str | None:
    """Where the study caches frozen-feature banks: ``evaluate.bank_cache`` when given (null: no cache), else
    ``work/banks``."""
    return cfg.evaluate.get("bank_cache", str(work / "banks"))


def bank_disk_estimate(cfg: StudyConfig) -> int:
    """At most how many bytes the study's feature-bank cache (``workdir/banks``) takes: one bank over every
    labelled phantom per variant that a frozen-feature protocol reads (linear and non-linear share it); 0 when
    no protocol reads one or ``evaluate.bank_cache`` is null."""
    from pipeline.evaluation.downstream import bank_spec
    from pipeline.evaluation.features import bank_cache_bytes
    from pipeline.train.step import build_model

    if not cfg.variants or not {"linear", "nonlinear"} & set(cfg.protocols) or \
            _bank_cache(cfg, Path(cfg.workdir)) is None:
        return 0
    ev = _evaluate_preset(cfg)
    pt = load_config(PretrainConfig, cfg.pretrain_preset, deep_update({"data": "x"}, cfg.pretrain))
    channels = sum(build_model(pt.model).feature_channels) * len(ev.feature_timesteps)
    spec = bank_spec(ev, ev.patch_size_zyx or pt.patches.patch_size_zyx, pt.patches.window_hu)
    return len(cfg.variants) * bank_cache_bytes(cfg.n_labeled, spec, channels)


def disk_note(cfg: StudyConfig, work: Path) -> str:
    """One line on the feature banks' disk need against the free space where they go (``work/banks`` or
    ``evaluate.bank_cache``; its nearest existing folder): a warning when they may not fit (the cache then turns
    itself off: slower, not fatal). Names no path."""
    need = bank_disk_estimate(cfg)
    target = Path(_bank_cache(cfg, work) or work / "banks").resolve()
    free = shutil.disk_usage(next(p for p in (target, *target.parents) if p.exists())).free
    if need <= free:
        return f"disk: feature banks up to {need / 1e9:.1f} GB, {free / 1e9:.0f} GB free"
    return (f"warning: the feature banks may take up to {need / 1e9:.1f} GB and their disk has {free / 1e9:.1f} GB "
            f"free; once it is full the banks are recomputed instead of cached (slower): free space, choose another "
            f"--workdir, or --set evaluate.bank_cache=null")


def _pretrain_all(cfg: StudyConfig, work: Path, data: dict[str, str], stamp: str, guide_runs: dict[str, str],
                  t0: float) -> dict[str, str]:
    from pipeline.distributed.pretrain import run_pretrain

    runs = {}
    variants = list(cfg.variants) + (["ceiling"] if cfg.ceiling is not None else [])
    for variant in variants:
        pt = load_config(PretrainConfig, cfg.pretrain_preset, pretrain_overrides(
            cfg, variant, data["unlabeled"], f"study-{stamp}-{variant}", str(work / "runs"), guide_runs))
        runs[variant] = run_pretrain(pt)["run_id"]
        _log(f"pretrained {variant}: run {runs[variant]}", t0)
    return runs


def run_study(cfg: StudyConfig) -> dict:
    """Synth + preprocess, (guide), pretrain every variant, evaluate every protocol and label budget, the
    ceiling, compare; writes the table, plot and JSON to the comparison run.

    Returns ``pretrain_runs`` {variant: run id}, ``rows`` (StudyRow list), ``table`` (markdown), ``json``
    (the one-line summary), ``guide_runs`` {guided variant: guide run id}, ``compare`` (the ``run_compare``
    result), ``seconds`` per stage.
    """
    from pipeline import tracking
    from pipeline.evaluation.compare import run_compare
    from pipeline.evaluation.study_report import label_efficiency_png, study_json, study_table

    work, t0, stamp = Path(cfg.workdir).resolve(), time.perf_counter(), time.strftime("%Y%m%d-%H%M%S")
    seconds: dict[str, float] = {}
    _log(disk_note(cfg, work), t0)
    data = _corpora(cfg, work)
    seconds["data"] = time.perf_counter() - t0
    _log(f"corpora ready in {work / 'data'}", t0)
    guide_runs = _guides(cfg, work, data, stamp, t0)
    seconds["guide"] = time.perf_counter() - t0 - sum(seconds.values())
    pretrain_runs = _pretrain_all(cfg, work, data, stamp, guide_runs, t0)
    seconds["pretrain"] = time.perf_counter() - t0 - sum(seconds.values())
    jobs = [(v, p, b) for v in cfg.variants for p in cfg.protocols for b in cfg.train_cases]
    jobs += [("ceiling", "supervised", b) for b in cfg.train_cases] if cfg.ceiling is not None else []
    ceiling = {b: ceiling_settings(cfg, b) for b in cfg.train_cases} if cfg.ceiling is not None else {}
    steps = [ceiling[b]["steps"] if v == "ceiling" else 0 for v, _, b in jobs]
    rows, took = [], []
    for n, (variant, protocol, budget) in enumerate(jobs, start=1):
        t_job = time.perf_counter()
        if variant == "ceiling":
            row = _evaluate(cfg, data["labeled"], work, variant, pretrain_runs["ceiling"], "finetune", budget,
                            {"finetune": ceiling[budget]})
            row.protocol = "supervised"
        else:
            row = _evaluate(cfg, data["labeled"], work, variant, pretrain_runs[variant], protocol, budget)
        row.variant = variant
        rows.append(row)
        took.append(time.perf_counter() - t_job)
        _log(f"[{n}/{len(jobs)}] {variant} / {protocol} / train cases {budget}: mean Dice {row.mean:.3f} "
             f"± {row.std:.3f} ({evaluation_eta(took, steps)})", t0)
    seconds["evaluate"] = time.perf_counter() - t0 - sum(seconds.values())
    full = tuple(r.run_id for r in rows if r.train_cases == "all" and r.variant != "ceiling")
    compare = run_compare(CompareConfig(run_ids=full or tuple(r.run_id for r in rows), name=f"study-{stamp}",
                                        tracking=cfg.tracking))
    seconds["total"] = time.perf_counter() - t0
    table, summary = study_table(rows), study_json(rows, seconds["total"])
    uri = compare["tracking_uri"]
    out_dir = work / "study" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.md").write_text(table)
    (out_dir / "study.json").write_text(summary + "\n")
    label_efficiency_png(rows, out_dir / "label_efficiency.png")
    tracking.log_artifacts(uri, compare["run_id"], out_dir, "study")
    _log(f"done; comparison run {compare['run_id']} (study table, label-efficiency plot and JSON under study/)", t0)
    return {"pretrain_runs": pretrain_runs, "rows": rows, "table": table, "json": summary, "guide_runs": guide_runs,
            "compare": compare, "seconds": seconds}
