"""Downstream protocols without Ray: fold planning, losses, HD95, fold summaries, finetune vs frozen training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import EvaluateConfig, PretrainConfig, UserError, load_config
from pipeline.evaluation.aggregate import mean_over_cases, summarize_folds, summary_csv, summary_table
from pipeline.evaluation.folds import check_disjoint, evaluation_folds, limit_patients, patient_of
from pipeline.evaluation.losses import dice_ce_loss, predict_labels, segmentation_loss
from pipeline.evaluation.surface import hd95_mm, hd95_per_organ
from pipeline.labels import NUM_ORGANS
from tests.conftest import write_tiny_corpus


def _items():
    """7 items / 5 patients: the two BTCV-like crops share patient 'btcv'; two phantoms share 'p1'."""
    items = ["img0001", "img0002", "ph0", "ph1a", "ph1b", "ph2", "ph3"]
    keys = ["btcv", "btcv", None, "p1", "p1", "", float("nan")]
    return items, keys


@pytest.mark.parametrize("split,folds", [("kfold", 5), ("kfold", 3), ("holdout", 1)])
def test_evaluation_folds_never_put_a_patient_in_two_splits(split, folds):
    items, keys = _items()
    plan = evaluation_folds(items, keys, split, folds=max(folds, 2), val_cases=1 if split == "kfold" else 0)
    assert len(plan) == folds
    owner = {i: patient_of(i, k) for i, k in zip(items, keys)}
    check_disjoint(plan, owner)                                       # raises on a leak
    for fold in plan:
        tests = set(fold["test"])
        assert ("img0001" in tests) == ("img0002" in tests)           # one patient, one test fold
        assert ("ph1a" in tests) == ("ph1b" in tests)
    if split == "kfold":
        assert sorted(i for f in plan for i in f["test"]) == sorted(items)
        assert all(len({owner[i] for i in f["val"]}) == 1 for f in plan)


def test_check_disjoint_detects_a_leak():
    with pytest.raises(ValueError, match="patient:btcv is in both"):
        check_disjoint([{"train": ["img0001"], "val": [], "test": ["img0002"]}],
                       {"img0001": "patient:btcv", "img0002": "patient:btcv"})


def test_train_cases_limits_patients_nested_and_keeps_patients_whole():
    items, keys = _items()
    one = evaluation_folds(items, keys, "holdout", test_fraction=0.2, train_cases=1, seed=3)[0]
    two = evaluation_folds(items, keys, "holdout", test_fraction=0.2, train_cases=2, seed=3)[0]
    owner = {i: patient_of(i, k) for i, k in zip(items, keys)}
    assert len({owner[i] for i in one["train"]}) == 1 and len({owner[i] for i in two["train"]}) == 2
    assert set(one["train"]) <= set(two["train"])
    assert limit_patients(["a", "b", "c"], ["x", "x", None], 1, seed=0) in (["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"train_cases must be in \[1, 2\]"):
        limit_patients(["a", "b", "c"], ["x", "x", None], 3, seed=0)
    with pytest.raises(ValueError, match="split must be"):
        evaluation_folds(items, keys, "loo")


def test_config_rejects_bad_protocol_and_timesteps():
    with pytest.raises(UserError, match="protocol"):
        load_config(EvaluateConfig, None, {"data": "x", "protocol": "probe"})
    with pytest.raises(UserError, match="feature_timesteps"):
        load_config(EvaluateConfig, None, {"data": "x", "feature_timesteps": []})
    assert load_config(EvaluateConfig, "evaluate-kfold-tiny", {"data": "x"}).split == "kfold"


def test_dice_ce_matches_thresholded_prediction_and_golden_value():
    torch.manual_seed(0)
    logits = torch.randn(2, NUM_ORGANS, 3, 4, 5)
    label = torch.randint(0, NUM_ORGANS + 1, (2, 3, 4, 5))
    full = torch.cat([torch.zeros_like(logits[:, :1]), logits], 1)
    assert torch.equal(full.argmax(1).to(torch.uint8), predict_labels(torch.sigmoid(logits)))
    # zero logits: CE = log(14); soft Dice of a uniform 1/14 softmax computed by hand
    zero = torch.zeros(1, NUM_ORGANS, 2, 2, 2)
    lab = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    lab[0, 0, 0, 0] = 6
    p = 1 / 14
    dice_liver = (2 * p + 1) / (8 * p + 1 + 1)
    dice_other = 1 / (8 * p + 1)
    expected = np.log(14) + 1 - (dice_liver + 12 * dice_other) / 13
    assert float(dice_ce_loss(zero, lab)) == pytest.approx(expected, rel=1e-5)
    good = torch.full((1, NUM_ORGANS, 2, 2, 2), -8.0)
    good[0, 5, 0, 0, 0] = 8.0
    assert float(segmentation_loss("dice_ce", good, lab)) < 0.01 < float(dice_ce_loss(zero, lab))
    with pytest.raises(ValueError, match="loss must be one of"):
        segmentation_loss("focal", zero, lab)


def test_dice_ce_body_mask_removes_voxels():
    logits = torch.zeros(1, NUM_ORGANS, 2, 2, 2)
    logits[0, 0, 1] = 10.0                                            # wrong organ in the z=1 half
    label = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0] = True
    ce_only_good = dice_ce_loss(logits, label, mask) - dice_ce_loss(logits, label, None)
    assert float(ce_only_good) < 0                                    # masked-out wrong voxels cost nothing


def test_hd95_golden_shift_in_mm():
    ref = np.zeros((12, 12, 12), bool)
    ref[3:8, 3:8, 3:8] = True
    pred = np.roll(ref, 2, axis=0)                                    # 2 voxels along z
    assert hd95_mm(pred, ref, (3.0, 1.0, 1.0)) == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert hd95_mm(ref, ref, (1.0, 1.0, 1.0)) == 0.0
    labels = ref.astype(np.uint8) * 6
    out = hd95_per_organ(labels, labels, (2.0, 2.0, 2.0))
    assert out.shape == (NUM_ORGANS,) and out[5] == 0.0 and np.isnan(out[0])


def test_fold_summary_golden_mean_and_std():
    fold_a = np.full(NUM_ORGANS, np.nan)
    fold_b = np.full(NUM_ORGANS, np.nan)
    fold_a[5], fold_b[5] = 0.8, 0.6                                   # liver
    fold_a[0], fold_b[0] = 0.2, np.nan                                # spleen only in fold a
    s = summarize_folds([fold_a, fold_b])
    m = s.metrics()
    assert m["dice_liver"] == pytest.approx(0.7) and m["dice_liver_std"] == pytest.approx(0.1)
    assert m["dice_spleen"] == pytest.approx(0.2) and m["dice_spleen_std"] == 0.0
    assert m["dice_mean"] == pytest.approx((0.5 + 0.6) / 2) and m["dice_mean_std"] == pytest.approx(0.05)
    assert np.isnan(m["dice_aorta"])
    assert "| liver | 0.700 ± 0.100 |" in summary_table({"pretrained": s})
    assert summary_csv({"pretrained": s}).splitlines()[0] == "organ,pretrained_mean,pretrained_std"
    case = mean_over_cases({"a": fold_a, "b": fold_b})
    assert case[5] == pytest.approx(0.7)


def _tiny_model_file(tmp_path, objective="diffusion"):
    from pipeline.train.checkpoint import save_model
    from pipeline.train.step import build_model

    cfg = PretrainConfig(data=str(tmp_path), objective=objective, model={"channels": (8, 16), "time_embed_dim": 16},
                         patches={"patch_size_zyx": (8, 8, 8)})
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(path, build_model(cfg.model), cfg, step=0)
    return path


def _tiny_eval_cfg(data, **over) -> EvaluateConfig:
    return EvaluateConfig.model_validate({
        "data": str(data), "hd95": True,
        "head": {"steps": 3, "windows_per_volume": 2, "voxels_per_window": 64, "batch_voxels": 32, "val_every": 2},
        "finetune": {"steps": 3, "batch_size": 1, "val_every": 2, "backbone_lr_scale": 0.1}, **over})


@pytest.mark.parametrize("protocol,variant", [("linear", "pretrained"), ("nonlinear", "random_init"),
                                              ("finetune", "pretrained"), ("nonlinear", "ceiling")])
def test_protocols_train_and_predict_whole_volumes(tmp_path, protocol, variant):
    from pipeline.data.patches import load_volume_refs
    from pipeline.evaluation.downstream import evaluate_backbone
    from pipeline.train.checkpoint import load_pretrained

    data = write_tiny_corpus(tmp_path / "data", n=3)
    backbone, pcfg = load_pretrained(_tiny_model_file(tmp_path), random_init=variant != "pretrained")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    refs = load_volume_refs(data, require_labels=True)
    cfg = _tiny_eval_cfg(data, protocol=protocol, loss="dice_ce" if protocol == "linear" else "bce_dice",
                         ceiling={"steps": 3, "batch_size": 1, "val_every": 2})
    out = evaluate_backbone(backbone, pcfg, cfg, refs[:1], refs[2:], val_refs=refs[1:2], variant=variant)
    assert set(out["dice"]) == {refs[2].item_id} and out["dice"][refs[2].item_id].shape == (NUM_ORGANS,)
    pred = out["pred"][refs[2].item_id]
    assert pred.shape == refs[2].shape_zyx and pred.dtype == np.uint8
    assert not pred[np.asarray(refs[2].mask()) == 0].any()           # nothing outside the body
    assert [s for s, _ in out["val_dice"]] == [2, 3] and out["best_step"] in (2, 3)
    assert len(out["losses"]) == 3 and np.isfinite(out["losses"]).all() and out["steps"] == 3
    assert out["hd95"][refs[2].item_id].shape == (NUM_ORGANS,)
    changed = any(not torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert changed == (protocol == "finetune" or variant == "ceiling")   # frozen unless all weights train


def test_network_training_stops_at_the_wall_clock_limit_and_keeps_the_best(tmp_path):
    from pipeline.data.patches import load_volume_refs
    from pipeline.evaluation.downstream import BackboneFeatures, train_network
    from pipeline.train.checkpoint import load_pretrained

    data = write_tiny_corpus(tmp_path / "data", n=2)
    backbone, pcfg = load_pretrained(_tiny_model_file(tmp_path))
    refs = load_volume_refs(data, require_labels=True)
    cfg = _tiny_eval_cfg(data)
    tc = cfg.finetune.model_copy(update={"steps": 10_000, "max_seconds": 0.01, "val_every": 0})
    feats = BackboneFeatures(backbone, pcfg, (50,), trainable=True)
    result = train_network(feats, refs[:1], cfg, tc, (8, 8, 8), (-1000, 1000), refs[1:])
    assert result.stopped_at_limit and result.steps_done < 10_000
    assert [s for s, _ in result.val_dice] == [result.steps_done] and result.best_step == result.steps_done


def test_finetune_gets_the_smaller_backbone_learning_rate(tmp_path):
    from pipeline.evaluation.downstream import BackboneFeatures, network_optimizer
    from pipeline.evaluation.heads import build_head
    from pipeline.train.checkpoint import load_pretrained

    backbone, pcfg = load_pretrained(_tiny_model_file(tmp_path))
    tc = EvaluateConfig(data="x", finetune={"lr": 1e-3, "backbone_lr_scale": 0.1}).finetune
    feats = BackboneFeatures(backbone, pcfg, (50,), trainable=True)
    opt = network_optimizer(feats, build_head("nonlinear", feats.feature_channels), tc)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    frozen = BackboneFeatures(backbone, pcfg, (50,), trainable=False)
    assert len(network_optimizer(frozen, build_head("linear", frozen.feature_channels), tc).param_groups) == 1
    x = torch.rand(1, 5, 8, 8, 8)
    assert all(not f.requires_grad for f in frozen(x))


def test_cli_user_errors_are_one_line(capsys):
    from jobs import compare, evaluate, export

    assert compare.main([]) == 2
    assert "run_ids" in capsys.readouterr().err
    assert export.main(["--out", "x"]) == 2
    assert "needs run_id" in capsys.readouterr().err
    assert evaluate.main(["--data", "x", "--checkpoint", "m.pt", "--folds", "1"]) == 2
    assert "folds" in capsys.readouterr().err


def test_cross_dataset_fold_trains_on_all_of_data_and_tests_on_all_of_test_data(tmp_path):
    from pipeline.distributed.evaluate import plan_folds
    from pipeline.data.patches import load_volume_refs

    a = load_volume_refs(write_tiny_corpus(tmp_path / "a", n=3), require_labels=True)
    b = load_volume_refs(write_tiny_corpus(tmp_path / "b", n=2), require_labels=True)
    for r in b:
        r.item_id = "b-" + r.item_id
    cfg = EvaluateConfig(data=str(tmp_path / "a"), test_data=str(tmp_path / "b"), val_cases=1)
    (fold,) = plan_folds(cfg, a, b)
    assert len(fold["train"]) == 2 and len(fold["val"]) == 1
    assert sorted(fold["train"] + fold["val"]) == ["v0", "v1", "v2"]
    assert sorted(fold["test"]) == ["b-v0", "b-v1"]
    (one,) = plan_folds(cfg.model_copy(update={"train_cases": 1}), a, b)
    assert len(one["train"]) == 1 and one["val"] == fold["val"]
    with pytest.raises(UserError, match="share item ids"):
        plan_folds(cfg, a, a)
    with pytest.raises(UserError, match="val_cases"):
        plan_folds(cfg.model_copy(update={"val_cases": 3}), a, b)


@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_split_does_not_change_when_the_same_scans_are_preprocessed_again(tmp_path, split):
    """Keyed item ids are new on every preprocessing run (a random key per output folder): the folds follow
    the volumes' content, so a rerun of the demo or study tests on the same scans."""
    from pipeline.data.patches import load_volume_refs
    from pipeline.distributed.evaluate import plan_folds

    refs = load_volume_refs(write_tiny_corpus(tmp_path / "a", n=7, shape=(12, 10, 8)), require_labels=True)
    cfg = EvaluateConfig(data=str(tmp_path / "a"), split=split, folds=3, val_cases=1 if split == "kfold" else 0)
    first = plan_folds(cfg, refs)
    digest = {r.item_id: r.content_digest() for r in refs}
    rerun = load_volume_refs(tmp_path / "a", require_labels=True)[::-1]
    for k, r in enumerate(rerun):                                    # new ids, in another order
        r.item_id = f"ct-{(k * 37) % 101:04d}"
    again = plan_folds(cfg, rerun)
    digest_again = {r.item_id: r.content_digest() for r in rerun}
    as_content = lambda folds, d: [{p: [d[i] for i in ids] for p, ids in f.items()} for f in folds]  # noqa: E731
    assert as_content(again, digest_again) == as_content(first, digest)


def test_ceiling_network_gets_its_own_coordinate_input(tmp_path):
    """The ceiling is a random-init network of the pretrained model's architecture; ``ceiling_guidance`` sets its
    coordinate input (none by default: supervised training learned faster without it on the tuning phantoms).
    Pretrained weights keep theirs."""
    from pipeline.data.conditioning import cond_channels
    from pipeline.train.checkpoint import load_pretrained, save_model
    from pipeline.train.step import build_model

    cfg = PretrainConfig.model_validate({"data": "x", "patches": {"patch_size_zyx": [8, 16, 16]},
                                         "model": {"channels": [8, 16], "time_embed_dim": 16, "guidance": "bodybox"}})
    save_model(tmp_path / "model.pt", build_model(cfg.model), cfg, 0)
    same, same_cfg = load_pretrained(tmp_path / "model.pt", random_init=True)
    bare, bare_cfg = load_pretrained(tmp_path / "model.pt", random_init=True, guidance="none")
    assert same_cfg.model.guidance == "bodybox" and bare_cfg.model.guidance == "none"
    assert cond_channels(bare_cfg.model) == 0 < cond_channels(same_cfg.model)
    first = lambda m: next(p for p in m.parameters() if p.dim() == 5)  # noqa: E731 - the stem's kernel
    assert first(bare).shape[1] < first(same).shape[1]
    assert bare_cfg.model.model_copy(update={"guidance": "bodybox"}) == same_cfg.model   # nothing else changes
    with pytest.raises(ValueError, match="random_init"):
        load_pretrained(tmp_path / "model.pt", guidance="none")
    assert EvaluateConfig(data="x").ceiling_guidance == "none"
    assert load_config(EvaluateConfig, "evaluate-tiny", {"data": "x"}).ceiling_guidance == "none"


def test_progress_line_eta_respects_the_wall_clock_budget(capsys):
    """A ceiling capped at 180 s must not promise an ETA of 800 s (the steps it will never reach)."""
    from pipeline.distributed.evaluate import progress_printer

    progress_printer("[x]", every_s=0)(100, 1500, 0.5, 60.0)
    progress_printer("[x]", every_s=0, limit_s=180)(100, 1500, 0.5, 60.0)
    free, capped = capsys.readouterr().out.strip().splitlines()
    assert free.endswith("1.7 steps/s ETA 840 s") and capped.endswith("1.7 steps/s ETA 120 s")
