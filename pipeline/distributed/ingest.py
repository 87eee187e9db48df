"""Ray Data adapter of the preprocess stage: one map task (1 CPU) per item, then the manifest.

The work itself is ``pipeline.ingest.preprocess.preprocess_item`` (plain Python, tested without Ray).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from pipeline.config import PreprocessConfig, UserError
from pipeline.distributed.runtime import init_ray
from pipeline.ingest.manifest import read_manifest, skipped_row, write_manifest
from pipeline.ingest.preprocess import preprocess_item
from pipeline.io.layouts import discover_items


def _check_output(cfg: PreprocessConfig) -> Path:
    """The output folder (created); refuses one inside the input folder (a rerun would read its own output)."""
    inp, out = Path(os.path.abspath(cfg.input)), Path(os.path.abspath(cfg.output))
    if out == inp or inp in out.parents:
        raise UserError(f"output folder '{cfg.output}' is inside the input folder '{cfg.input}': "
                        "choose an output folder outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder '{cfg.output}': {e.strerror}") from None
    return out


def run_preprocess(cfg: PreprocessConfig, progress: bool = True) -> pd.DataFrame:
    """Preprocess every item of ``cfg.input`` into ``cfg.output`` with Ray Data; return the manifest.

    Layout errors raise UserError before Ray starts. Each item is one block and one 1-CPU map task, so a
    large scan never waits behind another in the same block. Rows travel back as JSON strings (rows of
    accepted and rejected items have different null columns, which Arrow blocks would have to unify).
    """
    items, skipped = discover_items(cfg.input)
    out_dir = _check_output(cfg)
    # --- Ray ---------------------------------------------------------------------------------------------
    import ray

    init_ray(cfg.num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = progress

    def work(item: dict) -> dict:
        return {"row_json": json.dumps(preprocess_item(item, cfg, out_dir))}

    ds = ray.data.from_items([i.to_dict() for i in items], override_num_blocks=len(items))
    rows = [json.loads(r["row_json"]) for r in ds.map(work, num_cpus=1).take_all()]
    # ------------------------------------------------------------------------------------------------------
    write_manifest(rows + [skipped_row(path, reason) for path, reason in skipped], out_dir)
    return read_manifest(out_dir)
