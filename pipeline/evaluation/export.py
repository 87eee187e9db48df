"""`anatdiff export`: a pretrained backbone (and its guide) as a folder that loads with plain PyTorch.

The folder holds ``anatdiff_backbone.py`` (one standalone module: the UNet, its blocks, the coordinate
encodings, the diffusion schedule and the guide network, generated from this package's own sources so it
cannot drift, plus loaders), ``weights.pt`` (the backbone's state dict, tensors only), ``guide_weights.pt``
for a learned guide, ``config.json`` (the resolved pretrain config and the input conventions) and a README.
No anatdiff, MONAI or pydantic import is needed to use it: ``torch`` and ``numpy`` only.
"""

from __future__ import annotations

import ast
import json
import tempfile
from pathlib import Path

import torch

from pipeline.config import ExportConfig, UserError
from pipeline.models.weights import load_plain
from pipeline.train.checkpoint import load_pretrained

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: modules copied into the standalone file, dependency order
STANDALONE_SOURCES = ("pipeline/models/blocks.py", "pipeline/models/unet3d.py", "pipeline/data/conditioning.py",
                      "pipeline/diffusion/schedules.py", "pipeline/guide/model.py")
MODULE_NAME = "anatdiff_backbone"
EXPORT_FORMAT = "anatdiff.export/1"

_LOADERS = '''

# ------------------------------------------------------------------------------------------ loaders (export)
import json as _json
from pathlib import Path as _Path

PAD_HU = -1024


def load_config(directory) -> dict:
    """``config.json`` of an export folder: ``model``, ``diffusion``, ``patches`` and ``conventions``."""
    return _json.loads((_Path(directory) / "config.json").read_text())


def guidance_channels(config: dict) -> int:
    """Channels of the encoded coordinates the backbone takes as ``cond`` (0 when unguided)."""
    m = config["model"]
    if m["guidance"] == "none":
        return 0
    return encoding_channels(m["guidance_encoding"], m["guidance_frequencies"])


def load_backbone(directory, map_location="cpu"):
    """(UNet3D in eval mode with the exported weights loaded strictly, config dict)."""
    config = load_config(directory)
    m = config["model"]
    model = UNet3D(1, 1, channels=tuple(m["channels"]), blocks_per_level=m["blocks_per_level"],
                   time_embed_dim=m["time_embed_dim"], cond_channels=guidance_channels(config),
                   cond_injection=m["guidance_injection"], stem_stride=m.get("stem_stride", 1))
    state = torch.load(_Path(directory) / "weights.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval(), config


def load_guide(directory, map_location="cpu"):
    """The learned coordinate guide (eval mode), or None when the backbone was not trained with one."""
    config = load_config(directory)
    if config.get("guide") is None:
        return None
    guide = CoordinateGuide(**config["guide"])
    state = torch.load(_Path(directory) / "guide_weights.pt", map_location=map_location, weights_only=True)
    guide.load_state_dict(state, strict=True)
    return guide.eval()


def body_bbox_zyx(body_mask_zyx):
    """Inclusive (first, last) voxel of a (D, H, W) body mask along z, y, x."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(np.asarray(body_mask_zyx).any(axis=other))
        box.append((int(idx[0]), int(idx[-1])))
    return tuple(box)


@torch.no_grad()
def guide_coords(guide, volume_hu_zyx):
    """(3, D, H, W) float32 learned coordinates of a whole (D, H, W) HU volume (padded with air, cropped)."""
    x = np.clip(np.asarray(volume_hu_zyx, dtype=np.float32), *GUIDE_WINDOW_HU)
    x = torch.from_numpy((x - GUIDE_WINDOW_HU[0]) / (GUIDE_WINDOW_HU[1] - GUIDE_WINDOW_HU[0]))[None, None]
    pad_value = (max(PAD_HU, GUIDE_WINDOW_HU[0]) - GUIDE_WINDOW_HU[0]) / (GUIDE_WINDOW_HU[1] - GUIDE_WINDOW_HU[0])
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % guide.size_multiple]
    out = guide.forward_full(F.pad(x, pads, value=pad_value))
    d, h, w = volume_hu_zyx.shape
    return out[0, :, :d, :h, :w].numpy()


def scale_hu(volume_hu_zyx, window_hu):
    """HU clipped to ``window_hu`` and mapped to [0, 1] float32 (the backbone's input intensity)."""
    low, high = window_hu
    return ((np.clip(volume_hu_zyx, low, high) - low) / (high - low)).astype(np.float32)


def extract_features(model, config, image01, coords=None, timesteps=(50,), noise=None):
    """Multi-scale decoder features, coarsest first: list of (B, C_i * len(timesteps), D/s_i, H/s_i, W/s_i).

    image01: (B, 1, D, H, W) float, HU windowed to [0, 1] (``scale_hu``); D, H, W multiples of
    2**(levels - 1). coords: (B, 3, D, H, W) body coordinates (z, y, x) in about [0, 1] (learned guide or
    ``bodybox_coords``), ignored when unguided. A diffusion backbone sees its input noised to each timestep
    (``noise``: standard normal like image01, drawn when None); a restorative one sees it clean at t = 0.
    """
    m = config["model"]
    x0 = 2 * image01 - 1
    cond = None if m["guidance"] == "none" else encode_coords(coords, m["guidance_encoding"],
                                                             m["guidance_frequencies"])
    noised = config.get("objective", "diffusion") in ("diffusion", "none")
    d = config["diffusion"]
    make = {"cosine": cosine_beta_schedule, "linear": linear_beta_schedule}[d["schedule"]]
    schedule = DiffusionSchedule.from_betas(make(d["timesteps"]))
    noise = torch.randn_like(x0) if noise is None else noise
    per_t = []
    for t in (timesteps if noised else (0,)):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        x_t = q_sample(x0, tt, noise, schedule) if noised and t > 0 else x0
        per_t.append(model(x_t, tt, cond, return_features=True)[1])
    return [torch.cat(level, dim=1) for level in zip(*per_t)]
'''

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

Files: `anatdiff_backbone.py` (model code), `weights.pt` (state dict), `guide_weights.pt` (learned guide only),
`config.json` (the resolved pretrain config and these conventions).
"""


def standalone_source() -> str:
    """The text of ``anatdiff_backbone.py``: the ``STANDALONE_SOURCES`` bodies (module docstrings, future and
    ``pipeline`` imports removed) followed by the loaders."""
    parts = ['"""anatdiff backbone, standalone (generated by `anatdiff export`): torch + numpy only."""\n',
             "from __future__ import annotations\n", "import numpy as np\n"]
    for rel in STANDALONE_SOURCES:
        text = (PACKAGE_ROOT / rel).read_text()
        tree = ast.parse(text)
        drop = set()
        for node in tree.body:
            is_doc = node is tree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            is_internal = isinstance(node, ast.ImportFrom) and (node.module == "__future__"
                                                                 or (node.module or "").startswith("pipeline"))
            if is_doc or is_internal:
                drop.update(range(node.lineno, node.end_lineno + 1))
        lines = [line for n, line in enumerate(text.splitlines(), 1) if n not in drop]
        parts.append(f"\n# {'-' * 80} from {rel}\n" + "\n".join(lines) + "\n")
    return "".join(parts) + _LOADERS


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
        torch.save({k: v.clone() for k, v in blob["state_dict"].items()}, out / "guide_weights.pt")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "weights.pt")
    (out / f"{MODULE_NAME}.py").write_text(standalone_source())
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
