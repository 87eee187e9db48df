"""The trained segmenter: probabilities on the model grid, its folder round trip, and the MLflow model that a
fresh process loads with mlflow.pytorch / mlflow.pyfunc."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.config import PretrainConfig, UserError
from pipeline.evaluation.heads import build_head
from pipeline.evaluation.segmenter import Segmenter, load_segmenter, save_segmenter
from pipeline.train.step import build_model
from tests.conftest import write_tiny_corpus


def _segmenter(guidance="bodybox", card=None) -> Segmenter:
    model = {"channels": (8, 16), "time_embed_dim": 16, "stem_stride": 2, "guidance": guidance}
    if guidance == "learned":
        model["guide_checkpoint"] = "unused.pt"
    cfg = PretrainConfig(data="x", model=model, patches={"patch_size_zyx": (8, 8, 8)})
    torch.manual_seed(0)
    backbone = build_model(cfg.model)
    head = build_head("nonlinear", tuple(c * 2 for c in backbone.feature_channels), hidden=8,
                      feature_strides=backbone.feature_strides)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return Segmenter(backbone, cfg, head, "nonlinear", 8, (0, 50), (8, 8, 8), (3.0, 3.0, 3.0), card=card)


def _volume():
    rng = np.random.default_rng(0)
    vol = np.full((12, 14, 10), -1000, np.int16)
    vol[2:10, 3:12, 2:9] = rng.integers(-100, 200, size=(8, 9, 7))
    return vol


def test_probabilities_on_the_model_grid():
    seg, vol = _segmenter(), _volume()
    probs = seg.predict_probs(vol)
    assert probs.shape == (14, 12, 14, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert (probs[0, 0] == 1.0).all()                         # air slice: outside the body, background
    labels = seg(torch.from_numpy(vol.astype(np.float32)))
    assert labels.shape == vol.shape and labels.dtype == torch.uint8
    assert labels.numpy().max() > 0                          # random head weights predict some organs
    assert np.array_equal(labels.numpy(), probs.argmax(0))


def test_folder_round_trip_loads_without_pickles(tmp_path):
    seg, vol = _segmenter(card={"training_data": "3 labelled volumes", "protocol": "nonlinear"}), _volume()
    folder = save_segmenter(tmp_path / "seg", seg)
    assert {p.name for p in folder.iterdir()} == {"segmenter.json", "weights.pt", "MODEL_CARD.md"}
    card = (folder / "MODEL_CARD.md").read_text()
    assert "research only" in card and "3 labelled volumes" in card
    torch.load(folder / "weights.pt", weights_only=True)      # plain tensors only
    again = load_segmenter(tmp_path)                           # found below the folder given
    np.testing.assert_allclose(again.predict_probs(vol), seg.predict_probs(vol), atol=1e-6)
    with pytest.raises(UserError, match="not an anatdiff segmenter"):
        load_segmenter(tmp_path / "nothing")


def test_island_removal_is_saved_and_applied_to_label_maps(tmp_path):
    from pipeline.evaluation.postprocess import remove_islands

    seg, vol = _segmenter(), _volume()
    seg.island_fraction = 0.2
    again = load_segmenter(save_segmenter(tmp_path / "seg", seg))
    assert again.island_fraction == 0.2
    probs = np.zeros((14,) + vol.shape, np.float32)
    probs[0] = 1.0
    probs[:, 2:6, 3:8, 2:6], probs[6, 2:6, 3:8, 2:6] = 0.0, 1.0     # the liver
    probs[:, 9, 12, 8], probs[6, 9, 12, 8] = 0.0, 1.0                # and a liver speck far from it
    again.predict_probs = lambda volume, mask=None: probs
    labels = again(torch.from_numpy(vol.astype(np.float32))).numpy()
    assert (labels == 6).sum() == 80 and labels[9, 12, 8] == 0
    assert np.array_equal(labels, remove_islands(probs.argmax(0).astype(np.uint8), 0.2))
    with pytest.raises(ValueError, match="island_fraction must be in"):
        Segmenter(seg.features.backbone, seg.pretrain_cfg, seg.head, "nonlinear", 8, (0,), (8, 8, 8),
                  (3.0, 3.0, 3.0), island_fraction=2.0)


def test_learned_guidance_needs_its_guide():
    seg = _segmenter("learned")
    with pytest.raises(UserError, match="holds none"):
        seg.predict_probs(_volume())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_segmenter_registers_a_model_a_fresh_process_loads(tmp_path):
    import ray

    from pipeline.config import SegmenterConfig
    from pipeline.distributed.segmenter import run_train_segmenter
    from pipeline.train.checkpoint import save_model

    data = write_tiny_corpus(tmp_path / "data", n=3)
    seg = _segmenter()
    save_model(tmp_path / "model.pt", seg.features.backbone, seg.pretrain_cfg, step=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = SegmenterConfig(data=(str(data),), checkpoint=str(tmp_path / "model.pt"), num_cpus=2, val_cases=1,
                          head={"steps": 4, "windows_per_volume": 2, "val_every": 2},
                          tracking={"tracking_uri": uri})
    try:
        out = run_train_segmenter(cfg)
    finally:
        ray.shutdown()
    assert out["model_uri"] == "models:/anatdiff-segmenter@current" and out["version"] == 1
    np.save(tmp_path / "vol.npy", _volume())
    script = textwrap.dedent(f"""
        import mlflow, numpy as np, torch
        mlflow.set_tracking_uri({uri!r})
        vol = np.load({str(tmp_path / 'vol.npy')!r}).astype(np.float32)
        model = mlflow.pytorch.load_model("models:/anatdiff-segmenter@current")
        labels = model(torch.from_numpy(vol))
        assert labels.shape == vol.shape and labels.dtype == torch.uint8, labels.shape
        out = mlflow.pyfunc.load_model("models:/anatdiff-segmenter@current").predict(vol)
        assert np.asarray(out).shape == vol.shape
        print("LOADED", np.asarray(out).dtype)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert "LOADED" in done.stdout, done.stderr[-3000:]
