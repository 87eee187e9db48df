"""Configs: presets validate, unknown fields and bad values fail naming the field."""

from pathlib import Path

import pytest

from pipeline.config import (CONFIG_DIR, DemoConfig, GuideConfig, EvaluateConfig, PreprocessConfig, PretrainConfig,
                             UserError, load_config, parse_set_overrides)

REQUIRED = {"pretrain": {"data": "x"}, "guide": {"data": "x"}, "evaluate": {"data": "x"}, "preprocess": {"input": "a", "output": "b"},
            "demo": {}, "segmenter": {"data": ["x"]}}
MODELS = {"pretrain": PretrainConfig, "guide": GuideConfig, "evaluate": EvaluateConfig, "preprocess": PreprocessConfig,
          "demo": DemoConfig}


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    import pipeline.config as config_module

    job = preset.split("-")[0]
    model = MODELS.get(job) or getattr(config_module, f"{job.capitalize()}Config")
    cfg = load_config(model, preset, REQUIRED.get(job, {}))
    assert cfg is not None


def test_unknown_field_is_named(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("data: x\noptim:\n  stepz: 3\n")
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, f)
    msg = str(e.value)
    assert "optim.stepz" in msg and "unknown field" in msg and str(f) in msg


def test_bad_value_names_field_and_value():
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, {"data": "x", "optim": {"steps": -1}})
    assert "optim.steps" in str(e.value) and "-1" in str(e.value)


def test_patch_size_must_fit_unet():
    with pytest.raises(UserError, match="patch_size_zyx"):
        load_config(PretrainConfig, None, {"data": "x", "patches": {"patch_size_zyx": [30, 32, 32]}})


def test_learned_guidance_needs_checkpoint():
    with pytest.raises(UserError, match="guide_checkpoint"):
        load_config(PretrainConfig, None, {"data": "x", "model": {"guidance": "learned"}})


def test_unknown_preset_lists_presets():
    with pytest.raises(UserError, match="pretrain-tiny"):
        load_config(PretrainConfig, "no-such-preset")


def test_set_overrides_are_typed():
    assert parse_set_overrides(["optim.steps=10", "model.guidance=none", "x=[1, 2]"]) == {
        "optim": {"steps": 10}, "model": {"guidance": "none"}, "x": [1, 2]}
    with pytest.raises(UserError, match="key=value"):
        parse_set_overrides(["optim.steps"])


def test_segmenter_alias_latest_is_refused_with_the_fix():
    from pipeline.config import SegmenterConfig

    with pytest.raises(UserError, match="reserved by the MLflow registry"):
        load_config(SegmenterConfig, None, {"data": ["x"], "alias": "latest"})


def test_demo_probe_needs_two_phantoms_or_none():
    with pytest.raises(UserError, match="n_probe"):
        load_config(DemoConfig, None, {"n_probe": 1})


def test_guide_folders_are_named_and_weighted():
    cfg = load_config(GuideConfig, None, {"data": ["a", "b"], "data_weights": [3, 1],
                                          "eval_data": ["phantoms=/x/p", "/x/q"], "real_data": "chest=/x/c"})
    assert cfg.data_folders() == ("a", "b")
    assert cfg.named_folders("eval_data") == {"phantoms": "/x/p", "eval1": "/x/q"}
    assert cfg.named_folders("real_data") == {"chest": "/x/c"}
    assert load_config(GuideConfig, None, {"data": "a"}).named_folders("eval_data") == {}


@pytest.mark.parametrize("overrides, field", [
    ({"data": ["a", "b"], "data_weights": [1.0]}, "data_weights"),             # one weight per folder
    ({"data": "a", "data_weights": [0.0]}, "data_weights"),                    # positive sum
    ({"data": ["a", "b"], "data_weights": [2.0, -1.0]}, "data_weights"),       # non-negative
    ({"data": "a", "eval_data": ["x=/p", "x=/q"]}, "eval_data"),               # names unique
    ({"data": "a", "eval_data": "9lives=/p"}, "eval_data"),                    # a word starting with a letter
    ({"data": "a", "real_data": "chest="}, "real_data"),                       # a path after NAME=
])
def test_guide_folder_errors_name_the_field(overrides, field):
    with pytest.raises(UserError, match=field) as e:
        load_config(GuideConfig, None, overrides)
    assert "(got {" not in str(e.value)             # one line: not the whole config echoed back


def test_guide_crop_size_rule_applies_to_the_3d_guide_only():
    with pytest.raises(UserError, match="crop_size_zyx"):
        load_config(GuideConfig, None, {"data": "a", "crop_size_zyx": [24, 32, 32]})
    assert load_config(GuideConfig, None, {"data": "a", "kind": "bpr", "crop_size_zyx": [24, 32, 32]}).kind == "bpr"
