"""`anatdiff study`: preset, per-variant overrides, the report (table, plot, JSON), and a smoke run (slow)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from pipeline.config import StudyConfig, load_config
from pipeline.evaluation.study_report import StudyRow, label_efficiency_png, study_json, study_table


def test_study_preset_is_valid_and_covers_every_variant_protocol_and_budget():
    cfg = load_config(StudyConfig, "study-phantom-small")
    assert cfg.variants == ("random_init", "restorative", "unguided", "guided_bodybox", "guided_learned")
    assert cfg.protocols == ("linear", "nonlinear") and cfg.train_cases == (1, 2, "all")
    assert cfg.ceiling is not None and cfg.evaluate_preset == "evaluate-kfold-tiny"


@pytest.mark.parametrize("preset", ["study-phantom-small", "study-phantom-gpu"])
def test_study_presets_nested_configs_validate(preset):
    """Every config a study preset will build (guide, each variant's pretrain, evaluate, ceiling) validates
    before hours are spent: a wrong nested field fails here, not after the pretraining."""
    from pipeline.config import STUDY_VARIANTS, EvaluateConfig, GuideConfig, NetworkTrainConfig, PretrainConfig
    from pipeline.distributed.study import deep_update, guide_overrides, pretrain_overrides

    cfg = load_config(StudyConfig, preset)
    data = {"unlabeled": "u", "labeled": "l"}
    for kind in ("coords", "bpr"):                               # guided_learned, guided_bpr (add with --set)
        assert load_config(GuideConfig, cfg.guide_preset, guide_overrides(cfg, kind, data, "r", "s")).kind == kind
    guides = {"guided_learned": "G", "guided_bpr": "B"}
    for variant in STUDY_VARIANTS:                               # every variant a user may add with --set
        load_config(PretrainConfig, cfg.pretrain_preset, pretrain_overrides(cfg, variant, "d", "r", "s", guides))
    ev = load_config(EvaluateConfig, cfg.evaluate_preset, deep_update({"data": "d"}, cfg.evaluate))
    NetworkTrainConfig.model_validate(deep_update(ev.finetune.model_dump(mode="json"), cfg.ceiling))
    ceiling = load_config(PretrainConfig, cfg.pretrain_preset, pretrain_overrides(cfg, "ceiling", "d", "r", "s", None))
    assert ceiling.objective == "none" and ceiling.model.guidance == ev.ceiling_guidance == "none"


def test_study_warns_before_its_feature_banks_fill_the_disk(tmp_path, monkeypatch):
    """A study whose banks may not fit the free space says so in its first line (not 25 minutes later); no
    warning with room to spare, and no need at all when no frozen-feature protocol runs or the cache is off."""
    import shutil

    from pipeline.distributed.study import bank_disk_estimate, disk_note

    cfg = load_config(StudyConfig, "study-phantom-small")
    need = bank_disk_estimate(cfg)
    assert 9e9 < need < 20e9          # 5 variants x 15 phantoms; the measured cache took ~1.8 GB per variant
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need // 2))
    note = disk_note(cfg, tmp_path / "not-yet" / "study")
    assert note.startswith("warning") and "bank_cache=null" in note and str(tmp_path) not in note
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need * 2))
    assert not disk_note(cfg, tmp_path).startswith("warning")
    assert bank_disk_estimate(cfg.model_copy(update={"protocols": ("finetune",)})) == 0
    assert bank_disk_estimate(cfg.model_copy(update={"evaluate": {**cfg.evaluate, "bank_cache": None}})) == 0


def test_ceiling_steps_per_label_budget():
    """The preset's ceiling trains fewer steps on one or two patients than on all of them; a budget without an
    entry uses ceiling.steps; a non-positive entry is refused naming the field."""
    from pipeline.config import NetworkTrainConfig, UserError
    from pipeline.distributed.study import ceiling_settings

    cfg = load_config(StudyConfig, "study-phantom-small")
    steps = {b: NetworkTrainConfig.model_validate(ceiling_settings(cfg, b)).steps for b in cfg.train_cases}
    assert steps == {1: 500, 2: 800, "all": cfg.ceiling["steps"]}
    assert ceiling_settings(cfg, "all")["max_seconds"] == cfg.ceiling["max_seconds"]
    with pytest.raises(UserError, match="ceiling_steps"):
        load_config(StudyConfig, "study-phantom-small", {"ceiling_steps": {1: 0}})


def test_pretrain_overrides_differ_only_by_variant():
    from pipeline.config import STUDY_VARIANTS
    from pipeline.distributed.study import pretrain_overrides

    cfg = load_config(StudyConfig, "study-phantom-small", {"variants": list(STUDY_VARIANTS)})
    guides = {"guided_learned": "GUIDE", "guided_bpr": "BPR"}
    over = {v: pretrain_overrides(cfg, v, "d", f"r-{v}", "s", guides) for v in cfg.variants}
    assert over["random_init"]["objective"] == "none" and over["restorative"]["objective"] == "restorative"
    assert over["unguided"]["model"]["guidance"] == "none"
    assert over["guided_bodybox"]["model"] == {"guidance": "bodybox"}
    assert over["guided_learned"]["model"] == {"guidance": "learned", "guide_checkpoint": "runs:/GUIDE"}
    assert over["guided_bpr"]["model"] == {"guidance": "learned", "guide_checkpoint": "runs:/BPR"}
    assert over["contrastive"]["objective"] == "contrastive"
    assert {o["optim"]["steps"] for o in over.values()} == {cfg.pretrain["optim"]["steps"]}   # one budget
    assert {o["max_seconds"] for o in over.values()} == {cfg.pretrain["max_seconds"]}


def test_comparison_names_every_study_variant_apart():
    """The comparison table names a variant from its pretrain run's tags; the two learned guides (3-D coordinates,
    body-part regression) share guidance "learned" and are told apart by the guide's kind."""
    from pipeline.evaluation.compare import variant_label

    labels = [variant_label("none", "bodybox"), variant_label("restorative", "none"),
              variant_label("contrastive", "none"), variant_label("diffusion", "none"),
              variant_label("diffusion", "bodybox"), variant_label("diffusion", "learned", "coords"),
              variant_label("diffusion", "learned", "bpr")]
    assert labels[0] == "random init" and labels[-1] == "diffusion (body-part regression guide)"
    assert len(set(labels)) == len(labels)
    assert variant_label("diffusion", "learned") == "diffusion (learned guide)"   # runs from before the kind tag


def _rows():
    rows = [StudyRow(p, v, b, m, 0.01, n_train=n) for p in ("linear", "nonlinear")
            for v, base in (("random_init", 0.1), ("guided_learned", 0.3))
            for b, n, m in ((1, 1.0, base), ("all", 6.0, base + 0.2))]
    rows += [StudyRow("supervised", "ceiling", 1, 0.4, 0.05, n_train=1.0),
             StudyRow("supervised", "ceiling", "all", 0.7, 0.02, n_train=6.0)]
    return rows


def test_study_report_table_json_and_plot(tmp_path):
    rows = _rows()
    table = study_table(rows)
    assert "### nonlinear" in table and "| diffusion, learned guide | 0.300 ± 0.010 | 0.500 ± 0.010 |" in table
    assert table.count("*supervised ceiling*") == 2                    # closes every protocol's table
    line = study_json(rows + [StudyRow("linear", "restorative", 2, float("nan"), float("nan"))], 123.4)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["wall_s"] == 123 and parsed["ceiling"] == {"mean": 0.7, "std": 0.02}
    assert {"protocol": "nonlinear", "variant": "guided_learned", "train_cases": "all", "mean": 0.5,
            "std": 0.01} in parsed["rows"]
    assert parsed["rows"][-1]["mean"] is None                          # NaN -> null, still valid JSON
    assert all(r["variant"] != "ceiling" for r in parsed["rows"])
    png = label_efficiency_png(rows, tmp_path / "le.png")
    assert png.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_study_smoke(tmp_path):
    import ray

    from pipeline.distributed.study import run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(StudyConfig, "study-phantom-small", {
        "workdir": str(tmp_path / "study"), "n_unlabeled": 2, "n_labeled": 4,
        "target_spacing_zyx_mm": [8.0, 8.0, 8.0], "variants": ["random_init", "guided_bpr"],
        "protocols": ["linear", "finetune"], "train_cases": [1, "all"], "num_cpus": 2,
        "guide": {"optim": {"steps": 2, "warmup_steps": 1}, "checkpoint_every": 2, "log_every": 1,
                  "bpr_slice_size": 16, "consistency_views": 0},
        "pretrain": {"optim": {"steps": 2, "warmup_steps": 1}, "checkpoint_every": 2, "log_every": 1,
                     "registered_model": None, "patches": {"patch_size_zyx": [16, 16, 16]},
                     "model": {"channels": [8, 16]}},
        "evaluate": {"folds": 3, "val_cases": 0, "head": {"steps": 2, "windows_per_volume": 2},
                     "finetune": {"steps": 2}, "overlays": 0},
        "ceiling": {"steps": 2, "val_every": 0},
        "tracking": {"tracking_uri": uri}})
    try:
        out = run_study(cfg)
    finally:
        ray.shutdown()
    got = {(r.variant, r.protocol, r.train_cases) for r in out["rows"]}
    assert got == {(v, p, b) for v in ("random_init", "guided_bpr") for p in ("linear", "finetune")
                   for b in (1, "all")} | {("ceiling", "supervised", 1), ("ceiling", "supervised", "all")}
    assert all(0.0 <= r.mean <= 1.0 for r in out["rows"]) and all(np.isfinite(r.n_train) for r in out["rows"])
    parsed = json.loads(out["json"])
    assert len(parsed["rows"]) == 8 and parsed["ceiling"]["mean"] is not None
    ceiling_run = mlflow.MlflowClient(uri).get_run(out["pretrain_runs"]["ceiling"])
    assert ceiling_run.data.tags["anatdiff.guidance"] == "none"       # the ceiling's own random-init network
    md = out["compare"]["markdown"]
    assert "| random init |" in md and "| diffusion (body-part regression guide) |" in md
    client = mlflow.MlflowClient(uri)
    assert set(out["guide_runs"]) == {"guided_bpr"}
    assert client.get_run(out["guide_runs"]["guided_bpr"]).data.tags["anatdiff.guide_kind"] == "bpr"
    assert client.get_run(out["pretrain_runs"]["guided_bpr"]).data.tags["anatdiff.guide_kind"] == "bpr"
    arts = {a.path for a in client.list_artifacts(out["compare"]["run_id"], "study")}
    assert {"study/study.md", "study/study.json", "study/label_efficiency.png"} <= arts
    banks = list((tmp_path / "study" / "banks").glob("*/*.npz"))
    assert banks, "frozen-feature banks are cached per volume"
    print("study smoke seconds:", {k: round(v) for k, v in out["seconds"].items()})


def test_evaluation_eta_times_frozen_and_ceiling_jobs_apart():
    """The study's progress line: frozen-feature jobs by their mean time, the ceiling by seconds per step once
    one ceiling job has run, and named (not guessed from the frozen jobs) before that."""
    from pipeline.distributed.study import evaluation_eta

    steps = [0, 0, 0, 500, 2400]
    assert evaluation_eta([60.0], steps) == "evaluation ETA 2 min, then the ceiling's 2900 steps"
    assert evaluation_eta([60.0, 60.0, 60.0], steps) == "evaluation ETA 0 min, then the ceiling's 2900 steps"
    assert evaluation_eta([60.0, 60.0, 60.0, 300.0], steps) == "evaluation ETA 24 min"   # 0.6 s/step x 2400
    assert evaluation_eta([60.0] * 3 + [300.0, 1440.0], steps) == "evaluation ETA 0 min"
    assert evaluation_eta([], [500]) == "evaluation ETA unknown: the ceiling's 500 steps are next"


def test_progress_lines_name_the_study_variant_not_pretrained():
    """Every study row runs as the evaluate job's "pretrained" backbone; its fold lines carry the variant's name."""
    from pipeline.distributed.evaluate import fold_label
    from pipeline.evaluation.study_report import VARIANT_NAMES

    assert fold_label(0, 3, "pretrained") == "[fold 1/3 pretrained]"
    assert fold_label(2, 3, "pretrained", VARIANT_NAMES["ceiling"]) == "[fold 3/3 supervised ceiling]"
    assert fold_label(1, 3, "random_init", VARIANT_NAMES["guided_learned"]) == "[fold 2/3 random init]"
