"""`anatdiff export`: the folder loads in a fresh Python process with torch only, strictly, and gives the same
features as the package's own extractor."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.config import PretrainConfig, UserError

SCRIPT = """
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import anatdiff_backbone as ab
assert not any(m.split('.')[0] in ('pipeline', 'monai', 'pydantic', 'ray', 'mlflow') for m in sys.modules)
model, config = ab.load_backbone(sys.argv[1])
guide = ab.load_guide(sys.argv[1])
data = np.load(sys.argv[2])
x, coords, noise = (torch.from_numpy(data[k]) for k in ("x", "coords", "noise"))
with torch.no_grad():
    feats = ab.extract_features(model, config, x, coords, timesteps=(0, 50), noise=noise)
out = {"shapes": [list(f.shape) for f in feats], "sums": [float(f.double().sum()) for f in feats],
       "guide": None}
if guide is not None:
    vol = np.full((12, 16, 16), -1000, np.int16); vol[2:10, 4:12, 4:12] = 40
    c = ab.guide_coords(guide, vol)
    out["guide"] = [list(c.shape), float(c.min()), float(c.max()), float(np.float64(c).sum())]
print(json.dumps(out))
"""


def _model(tmp_path, guidance):
    from pipeline.guide.inference import save_guide
    from pipeline.guide.model import CoordinateGuide
    from pipeline.train.checkpoint import save_model
    from pipeline.train.step import build_model

    model = {"channels": (8, 16), "time_embed_dim": 16, "guidance": guidance}
    if guidance == "learned":
        torch.manual_seed(1)
        save_guide(tmp_path / "guide.pt", CoordinateGuide(channels=(8, 16), stride=2))
        model["guide_checkpoint"] = str(tmp_path / "guide.pt")
    cfg = PretrainConfig(data=str(tmp_path), model=model, patches={"patch_size_zyx": (8, 8, 8)})
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():                        # non-zero everywhere, so a wrong load would show
        p.data.normal_(0, 0.05)
    save_model(tmp_path / "model.pt", net, cfg, step=7)
    return tmp_path / "model.pt", cfg


@pytest.mark.parametrize("guidance", ["bodybox", "learned", "none"])
def test_export_loads_in_a_fresh_process_and_matches_the_package(tmp_path, guidance):
    from pipeline.evaluation.downstream import BackboneFeatures
    from pipeline.evaluation.export import export_backbone
    from pipeline.train.checkpoint import load_pretrained

    model_file, _ = _model(tmp_path, guidance)
    out = export_backbone(model_file, tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    expected = ["README.md", "anatdiff_backbone", "config.json", "weights.pt"]
    assert names == sorted(expected + (["guide_weights.pt"] if guidance == "learned" else []))
    config = json.loads((out / "config.json").read_text())
    assert config["conventions"]["axis_order"] == "zyx" and "LPS" in config["conventions"]["orientation"]
    weights = torch.load(out / "weights.pt", weights_only=True)
    backbone, pcfg = load_pretrained(model_file)
    assert list(weights) == list(backbone.state_dict())

    g = torch.Generator().manual_seed(0)
    x, coords = torch.rand(1, 1, 8, 8, 8, generator=g), torch.rand(1, 3, 8, 8, 8, generator=g)
    noise = torch.randn(1, 1, 8, 8, 8, generator=g)
    np.savez(tmp_path / "in.npz", x=x.numpy(), coords=coords.numpy(), noise=noise.numpy())
    proc = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(out), str(tmp_path / "in.npz")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = BackboneFeatures(backbone, pcfg, (0, 50))(torch.cat([x, coords, noise], dim=1))
    assert res["shapes"] == [list(f.shape) for f in ours]
    assert res["sums"] == pytest.approx([float(f.double().sum()) for f in ours], rel=1e-5, abs=1e-4)
    if guidance == "learned":
        from pipeline.guide.inference import load_guide, predict_coords

        shape, lo, hi, total = res["guide"]
        assert shape == [3, 12, 16, 16] and 0.0 <= lo <= hi <= 1.0
        vol = np.full((12, 16, 16), -1000, np.int16)
        vol[2:10, 4:12, 4:12] = 40
        ours = predict_coords(load_guide(tmp_path / "guide.pt"), vol)
        assert total == pytest.approx(float(np.float64(ours).sum()), rel=1e-6)
    else:
        assert res["guide"] is None


def test_export_ships_the_package_modules_not_a_copy(tmp_path):
    """The exported package is the package's own modules (imports renamed), closed under their imports, with the
    portable API as its __init__; exporting again into the folder replaces it (and a format-1 module file)."""
    from pipeline.evaluation.export import PACKAGE_ROOT, PORTABLE_API, export_backbone, shipped_modules

    shipped = shipped_modules()
    assert {"pipeline/models/unet3d.py", "pipeline/data/inputs.py", "pipeline/data/conditioning.py",
            "pipeline/diffusion/readout.py", "pipeline/guide/model.py", PORTABLE_API} <= set(shipped)
    assert not any(rel.startswith(("pipeline/evaluation/features", "pipeline/config", "pipeline/train"))
                   for rel in shipped)
    model_file, _ = _model(tmp_path, "bodybox")
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "anatdiff_backbone.py").write_text("raise ImportError('stale')")
    export_backbone(model_file, out)
    assert not (out / "anatdiff_backbone.py").exists()
    pkg = out / "anatdiff_backbone"
    for rel in shipped:
        source = (PACKAGE_ROOT / rel).read_text()
        target = pkg / "__init__.py" if rel == PORTABLE_API else pkg / rel.removeprefix("pipeline/")
        assert ast.dump(ast.parse(target.read_text())) == ast.dump(_renamed(ast.parse(source))), rel


def _renamed(tree: ast.AST) -> ast.AST:
    """``tree`` with every ``pipeline.`` import renamed ``anatdiff_backbone.`` (what the export must do, no more)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            node.module = "anatdiff_backbone." + node.module.removeprefix("pipeline.")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline."):
                    alias.name = "anatdiff_backbone." + alias.name.removeprefix("pipeline.")
    return tree


def test_export_errors(tmp_path):
    from pipeline.evaluation.export import export_backbone

    model_file, _ = _model(tmp_path, "learned")
    (tmp_path / "guide.pt").unlink()
    with pytest.raises(UserError, match="learned guide but no guide.pt"):
        export_backbone(model_file, tmp_path / "export")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UserError, match="not an anatdiff export"):
        export_backbone(_model(other, "none")[0], busy)


def test_export_refuses_a_bpr_guided_backbone(tmp_path):
    """A backbone guided by a body-part regression guide is refused at export time, not in the user's process."""
    from pipeline.evaluation.export import export_backbone
    from pipeline.guide.bpr import BodyPartRegressor
    from pipeline.guide.inference import save_guide

    model_file, _ = _model(tmp_path, "learned")
    save_guide(tmp_path / "guide.pt", BodyPartRegressor(channels=(8, 16), slice_size=16))
    with pytest.raises(UserError, match="'bpr' guide"):
        export_backbone(model_file, tmp_path / "export")
