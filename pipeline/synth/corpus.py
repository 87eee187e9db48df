"""`synthesize_corpus`: write n phantoms (NIfTI or DICOM, optionally labelled) with a process pool.

Layouts (``OUT`` = ``cfg.out``; case id ``phantom_<seed>_<index:04d>``):
- unlabelled: ``OUT/<case>.nii.gz`` or ``OUT/<case>/`` (DICOM series), ``OUT/meta/<case>.json``;
- labelled (nnU-Net v2 / MSD): ``OUT/imagesTr/<case>_0000.nii.gz`` or ``OUT/imagesTr/<case>/``,
  ``OUT/labelsTr/<case>.nii.gz``, ``OUT/dataset.json``, ``OUT/meta/<case>.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from pipeline.config import SynthConfig, UserError
from pipeline.synth.phantom import make_phantom
from pipeline.synth.writers import write_dataset_json, write_dicom_series, write_nifti


def case_paths(out: Path, case: str, fmt: str, labels: bool) -> tuple[Path, Path | None, Path]:
    """(image path, label path or None, meta path) of one case in the corpus layout."""
    if labels:
        image = out / "imagesTr" / (f"{case}_0000.nii.gz" if fmt == "nifti" else case)
        label = out / "labelsTr" / f"{case}.nii.gz"
    else:
        image, label = out / (f"{case}.nii.gz" if fmt == "nifti" else case), None
    return image, label, out / "meta" / f"{case}.json"


def write_case(out: str, seed: int, index: int, fmt: str, labels: bool, spacing_mm: float | None) -> dict:
    """Make phantom (seed, index) and write image, label and meta; returns the case record."""
    ph = make_phantom(seed, index, spacing_mm=spacing_mm, with_labels=labels)
    case = ph.meta["case_id"]
    image, label, meta = case_paths(Path(out), case, fmt, labels)
    if fmt == "nifti":
        write_nifti(image, ph.image_hu_zyx, ph.spacing_zyx_mm, ph.origin_xyz_mm)
    else:
        write_dicom_series(image, ph.image_hu_zyx, ph.meta)
    if label is not None:
        write_nifti(label, ph.label_zyx, ph.spacing_zyx_mm, ph.origin_xyz_mm)
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(ph.meta, indent=1))
    return {"case_id": case, "image": str(image), "label": None if label is None else str(label),
            "meta": str(meta), "fov": ph.fov, "scanner": ph.scanner.name}


def _check(cfg: SynthConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"synth: out '{cfg.out}' exists and is not a folder; give a folder path")
    if cfg.seed < 0:
        raise UserError(f"synth: seed must be >= 0, got {cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def synthesize_corpus(cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Write ``cfg.n`` phantoms (indices 0..n-1 of ``cfg.seed``) to ``cfg.out`` with ``cfg.workers`` processes.

    Returns one record per case, in index order: case_id, image, label (None without labels), meta, fov,
    scanner. ``progress(done, total)`` is called after each case. Deterministic: the same config writes the
    same arrays whatever the number of workers.
    """
    out = _check(cfg)
    workers = min(cfg.workers or os.cpu_count() or 1, cfg.n)
    jobs = [(str(out), cfg.seed, i, cfg.format, cfg.labels, cfg.spacing_mm) for i in range(cfg.n)]
    records: list[dict | None] = [None] * cfg.n
    if workers == 1:
        for i, job in enumerate(jobs):
            records[i] = write_case(*job)
            if progress:
                progress(i + 1, cfg.n)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(write_case, *job): job[2] for job in jobs}
            for done, fut in enumerate(as_completed(futures), start=1):
                records[futures[fut]] = fut.result()
                if progress:
                    progress(done, cfg.n)
    if cfg.labels:
        write_dataset_json(out, records, "_0000.nii.gz" if cfg.format == "nifti" else "")
    return records
