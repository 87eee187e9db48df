"""`anatdiff export`: a pretrained backbone (and its guide) as a folder that loads with plain PyTorch.

The folder holds the package ``anatdiff_backbone/``: ``pipeline/evaluation/portable.py`` as its ``__init__``
(load_backbone, load_guide, extract_features, guide_coords, scale_hu, body_bbox_zyx, bodybox_coords) and the
package modules it imports, copied as they are with their ``pipeline.`` imports renamed (``shipped_modules``
follows the imports, so what the export runs is what trained the backbone); ``weights.pt`` (the backbone's
state dict, tensors only), ``guide_weights.pt`` for a learned guide, ``config.json`` (the resolved pretrain
config and the input conventions) and a README. No anatdiff, MONAI or pydantic import is needed to use it:
``torch`` and ``numpy`` only.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.config import ExportConfig, UserError
from pipeline.models.weights import load_plain
from pipeline.train.checkpoint import load_pretrained

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: the exported package's ``__init__``; every package module it imports (transitively) is shipped with it
PORTABLE_API = "pipeline/evaluation/portable.py"
MODULE_NAME = "anatdiff_backbone"
EXPORT_FORMAT = "anatdiff.export/2"
_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)pipeline\.", re.MULTILINE)

_README = """# anatdiff pretrained backbone (export)

{source}

Load with PyTorch and numpy only (no anatdiff install needed):

```python
import sys; sys.path.insert(0, "{folder}")       # this folder
import anatdiff_backbone as ab
model, config = ab.load_backbone("{folder}")   # strict state-dict load
guide = ab.load_guide("{folder}")              # None unless guidance == "learned"
feats = ab.extract_features(model, config, image01, coords, timesteps=(50,))
```

## Input conventions (follow exactly)
- Orientation: canonical **LPS** (SimpleITK `DICOMOrient(image, "LPS")`, identity direction).
- Array axis order **(z, y, x)** (`sitk.GetArrayFromImage`), batch tensors (B, 1, D, H, W).
- Spacing: resample to {spacing} mm (z, y, x) before use, as in pretraining.
- Intensity: Hounsfield units clipped to the window {window} and mapped to [0, 1] (`ab.scale_hu`).
- Patch size in pretraining: {patch} voxels (z, y, x); D, H, W must be multiples of {multiple}.
- Coordinate input (guidance `{guidance}`): (B, 3, D, H, W) per-voxel body coordinates, channels (z, y, x),
  about [0, 1] over the body. `learned`: `ab.guide_coords(guide, volume_hu_zyx)` on the whole volume, then
  cut the patch; `bodybox`: `ab.bodybox_coords(patch_shape, ab.body_bbox_zyx(body_mask), patch_start)`;
  `none`: pass `coords=None`.
- Features: diffusion backbones are read at a small timestep (t = 50 in the paper's protocol) with one fixed
  noise draw per volume; restorative backbones at t = 0, clean.

Files: `anatdiff_backbone/` (the model code and these conventions, copied from anatdiff's own modules),
`weights.pt` (state dict), `guide_weights.pt` (learned guide only), `config.json` (the resolved pretrain config
and these conventions).
"""


def _top_level_imports(path: Path) -> list[str]:
    """``pipeline`` modules a file imports when it loads (top level; ``if TYPE_CHECKING`` blocks excluded)."""
    out = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("pipeline.")]
    return out


def shipped_modules() -> list[str]:
    """Repository paths of the modules the export ships: ``PORTABLE_API`` and every ``pipeline`` module it
    imports, transitively. Raises RuntimeError when one of them imports ``pipeline.config`` at load time (the
    export must not need pydantic): such an import belongs under ``if TYPE_CHECKING``."""
    todo, seen = [PORTABLE_API], []
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.append(rel)
        for module in _top_level_imports(PACKAGE_ROOT / rel):
            if module == "pipeline.config":
                raise RuntimeError(f"{rel} imports pipeline.config at load time; the export ships it without "
                                   f"pydantic: import the config under `if TYPE_CHECKING`")
            todo.append(module.replace(".", "/") + ".py")
    return sorted(seen)


def write_package(out_dir: Path) -> Path:
    """Write ``out_dir/anatdiff_backbone/`` (replacing a previous one): ``PORTABLE_API`` as ``__init__.py`` and
    the other shipped modules at their package paths, ``pipeline.`` imports renamed. Returns the folder."""
    pkg = out_dir / MODULE_NAME
    if pkg.exists():
        shutil.rmtree(pkg)
    stale = out_dir / f"{MODULE_NAME}.py"           # exports of format 1 were one generated file
    if stale.is_file():
        stale.unlink()
    for rel in shipped_modules():
        text = _IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MODULE_NAME}.",
                           (PACKAGE_ROOT / rel).read_text(encoding="utf-8"))
        parts = Path(rel).relative_to("pipeline").parts
        target = pkg / "__init__.py" if rel == PORTABLE_API else pkg.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(pkg).parents:
            init = pkg / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        target.write_text(text, encoding="utf-8")
    return pkg


def export_backbone(model_path: str | Path, out_dir: str | Path, guide_file: str | Path | None = None,
                    source: str = "") -> Path:
    """Write the export folder for ``model.pt`` (and ``guide.pt`` of a learned-guide backbone); returns it.

    ``guide_file`` defaults to ``guide.pt`` beside ``model_path``. Raises UserError when a learned-guide
    backbone comes without its guide, or ``out_dir`` is a non-empty folder without a previous export.
    """
    model, cfg = load_pretrained(model_path)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"export folder '{out}' exists and is not an anatdiff export; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    guide_cfg = None
    if cfg.model.guidance == "learned":
        guide_file = Path(guide_file) if guide_file else Path(model_path).parent / "guide.pt"
        if not guide_file.is_file():
            raise UserError(f"backbone '{model_path}' was pretrained with a learned guide but no guide.pt was "
                            f"found at '{guide_file}'")
        blob = load_plain(guide_file)
        guide_cfg = blob["config"]
        if guide_cfg.get("kind", "coords") != "coords":
            raise UserError(f"backbone '{model_path}' was pretrained with a {guide_cfg['kind']!r} guide; export "
                            f"ships the 3-D coordinate guide only (use `anatdiff predict`, or a coords guide)")
        torch.save({k: v.clone() for k, v in blob["state_dict"].items()}, out / "guide_weights.pt")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "weights.pt")
    write_package(out)
    multiple = 2 ** (len(cfg.model.channels) - 1)
    conventions = {"orientation": "LPS canonical (identity direction)", "axis_order": "zyx",
                   "spacing_zyx_mm": _spacing_of(cfg.data), "window_hu": list(cfg.patches.window_hu),
                   "patch_size_zyx": list(cfg.patches.patch_size_zyx), "size_multiple": multiple,
                   "coordinates": "(B, 3, D, H, W) body coordinates (z, y, x) in about [0, 1]"}
    config = {"format": EXPORT_FORMAT, "source": source, "objective": cfg.objective,
              "model": cfg.model.model_dump(mode="json"), "diffusion": cfg.diffusion.model_dump(mode="json"),
              "patches": cfg.patches.model_dump(mode="json"), "guide": guide_cfg, "conventions": conventions}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "README.md").write_text(_README.format(
        source=source or "Exported from an anatdiff model.pt.", folder=out.resolve(),
        spacing=conventions["spacing_zyx_mm"] or "the pretraining corpus' spacing", window=list(cfg.patches.window_hu),
        patch=list(cfg.patches.patch_size_zyx), multiple=multiple, guidance=cfg.model.guidance))
    return out


def _spacing_of(data_dir: str) -> list[float] | None:
    """The target spacing (z, y, x) mm of the pretraining corpus, read from its manifest when reachable."""
    try:
        import pandas as pd

        df = pd.read_parquet(Path(data_dir) / "manifest.parquet")
        values = df.loc[df["status"] == "accepted", "target_spacing_mm"].iloc[0]
        return [float(v) for v in values]
    except Exception:  # noqa: BLE001 - the corpus may live on another machine: the README then says so
        return None


def run_export(cfg: ExportConfig) -> dict:
    """Export a pretrain run's (or a checkpoint's) backbone to ``cfg.out``; with a run, also log the folder
    as the run's ``export/`` artifacts and register it (alias ``export``). Returns out, run_id, version."""
    from pipeline import tracking

    if cfg.checkpoint:
        out = export_backbone(cfg.checkpoint, cfg.out, source=f"checkpoint {Path(cfg.checkpoint).resolve()}")
        return {"out": str(out), "run_id": None, "version": None}
    uri = tracking.connect(cfg.tracking.tracking_uri)
    run = tracking.get_run(uri, cfg.run_id)
    if run.data.tags.get("anatdiff.job") != "pretrain":
        raise UserError(f"run {cfg.run_id} is not a pretrain run (anatdiff.job="
                        f"{run.data.tags.get('anatdiff.job')!r}); export takes a pretrain run id")
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_artifacts(uri, cfg.run_id, "model", tmp)
        out = export_backbone(local / "model.pt", cfg.out, source=f"MLflow run {cfg.run_id} ({uri})")
    tracking.log_artifacts(uri, cfg.run_id, out, "export")
    version = None
    if cfg.registered_model:
        version = tracking.register_model(uri, cfg.run_id, "export", cfg.registered_model, "export")
        tracking.set_tags(uri, cfg.run_id, {"anatdiff.export": f"{cfg.registered_model}/{version}"})
    return {"out": str(out), "run_id": cfg.run_id, "version": version, "tracking_uri": uri}
