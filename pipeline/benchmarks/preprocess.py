"""`anatdiff benchmark preprocess`: Ray Data preprocess vs a plain loop, time split, peak RSS of one scan.

Figures (one run, one machine, baselines in the same process; see docs/benchmarks.md):
- ``ray_vs_single_process``: volumes/s of ``run_preprocess`` (local Ray, the machine's cores, workers already
  started) / volumes/s of the same job with a plain loop instead of Ray Data (same functions, same manifest
  and reports). ``ray_vs_single_process_cold`` counts the first
  Ray Data job (worker start-up) too; ``ray_init_s`` is ``ray.init`` alone.
- ``preprocess_vs_read``: seconds per volume of the whole single-process job / seconds of the bare read + decompress.
The corpus: ``.nii.gz`` phantoms at 1.5 mm (``CORPUS_SPACING_MM``, clinical-like: 20-30 M voxels, 15-30 MB
compressed each) preprocessed to 3 mm, so reading, resampling and masking have realistic proportions (at the
phantoms' default 3 mm a volume decompresses in 20 ms and fixed per-item costs dominate).
- ``peak_rss_ratio``: peak RSS of a subprocess preprocessing one 512 x 512 x 600 int16 scan / its raw size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.config import PreprocessConfig, SynthConfig
from pipeline.ingest.body import body_mask
from pipeline.ingest.geometry import resample_hu_int16, to_canonical
from pipeline.io.layouts import discover_items
from pipeline.io.readers import read_image
from pipeline.synth.corpus import synthesize_corpus

MB = 1e6
BIG_SHAPE_ZYX = (600, 512, 512)
BIG_SPACING_ZYX_MM = (1.0, 0.8, 0.8)
BIG_TARGET_ZYX_MM = (2.0, 1.0, 1.0)
#: isotropic spacing of the benchmark phantoms (mm)
CORPUS_SPACING_MM = 1.5


def scratch(workdir: str | Path | None) -> Path:
    """``workdir`` (created) or a fresh temporary folder."""
    path = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="anatdiff-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_corpus(folder: Path, n: int, seed: int = 0, spacing_mm: float | None = CORPUS_SPACING_MM) -> list:
    """Synthesize ``n`` NIfTI phantoms at ``spacing_mm`` once; returns the discovered items."""
    if not (folder / "meta").is_dir() or len(list(folder.glob("*.nii.gz"))) != n:
        synthesize_corpus(SynthConfig(out=str(folder), n=n, seed=seed, spacing_mm=spacing_mm))
    return discover_items(folder)[0]


def preprocess_loop(cfg: PreprocessConfig) -> tuple[list[dict], float]:
    """The whole preprocess job without Ray (``run_preprocess`` with ``map_units_in_process``: the same
    discovery, ``run_unit`` calls, manifest and reports, in a loop in this process); (rows, seconds)."""
    from pipeline.distributed.ingest import map_units_in_process, run_preprocess

    shutil.rmtree(cfg.output, ignore_errors=True)   # else finished items would be reused (resume)
    t0 = time.perf_counter()
    manifest = run_preprocess(cfg, progress=False, map_units=map_units_in_process)
    return manifest.to_dict("records"), time.perf_counter() - t0


def source_mb(rows: list[dict]) -> float:
    """Decoded source size in MB (int16 voxels) of the accepted rows."""
    return sum(2 * float(np.prod(r["source_shape"])) for r in rows if r["status"] == "accepted") / MB


def time_split(items: list, cfg: PreprocessConfig, out_dir: Path) -> dict[str, float]:
    """Mean seconds per volume of the building blocks: read (+ decompress), canonical + resample, body mask,
    write (np.save of the volume and mask)."""
    totals = dict(read_s=0.0, resample_s=0.0, mask_s=0.0, write_s=0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in items:
        t0 = time.perf_counter()
        image = read_image(item.image)
        t1 = time.perf_counter()
        volume_hu, _ = resample_hu_int16(to_canonical(image), cfg.target_spacing_zyx_mm)
        t2 = time.perf_counter()
        mask = body_mask(volume_hu, cfg.body_threshold_hu, spacing_zyx_mm=cfg.target_spacing_zyx_mm).astype(np.uint8)
        t3 = time.perf_counter()
        np.save(out_dir / "volume.npy", volume_hu)
        np.save(out_dir / "mask.npy", mask)
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
    return {f"{k}_per_volume": v / len(items) for k, v in totals.items()}


def ray_preprocess(cfg: PreprocessConfig, num_cpus: int) -> dict[str, float]:
    """Seconds of ``ray.init`` and of two ``run_preprocess`` jobs (cold: workers start; warm: they exist)."""
    from pipeline.distributed.ingest import run_preprocess
    from pipeline.distributed.patch_dataset import local_ray

    times = {}
    with local_ray(num_cpus) as times["ray_init_s"]:
        for run in ("cold", "warm"):
            job = cfg.model_copy(update={"output": f"{cfg.output}-{run}"})
            shutil.rmtree(job.output, ignore_errors=True)
            t0 = time.perf_counter()
            manifest = run_preprocess(job, progress=False)
            times[f"ray_{run}_s"] = time.perf_counter() - t0
            times["ray_accepted"] = int((manifest.status == "accepted").sum())
    return times


#: runs in a fresh interpreter; VmHWM (peak RSS of this process image) is read from /proc: ru_maxrss would
#: carry the parent's high-water mark across fork + exec
_CHILD = """
import json, re, sys, time
from pipeline.config import PreprocessConfig
from pipeline.ingest.preprocess import preprocess_item
from pipeline.io.layouts import discover_items
from pipeline.io.readers import read_image

def hwm_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

args = json.loads(sys.argv[1])
items = discover_items(args["input"])[0]
cfg = PreprocessConfig(input=args["input"], output=args["output"], target_spacing_zyx_mm=args["target"],
                       log_to_mlflow=False)
before_kib = hwm_kib()
t0 = time.perf_counter()
row = preprocess_item(items[0], cfg, args["output"])
t1 = time.perf_counter()
peak_kib = hwm_kib()
read_image(items[0].image)
t2 = time.perf_counter()
print(json.dumps({"before_kib": before_kib, "peak_kib": peak_kib, "status": row["status"],
                  "reason": row.get("reason"), "preprocess_s": t1 - t0, "read_s": t2 - t1}))
"""


def write_big_scan(path: Path, shape_zyx: tuple[int, int, int]) -> float:
    """An uncompressed NIfTI int16 scan: air, an elliptic water body with a bone rod; returns raw MB."""
    z, y, x = shape_zyx
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 < 1
    bone = ((yy - 0.7 * y) / (0.05 * y)) ** 2 + ((xx - x / 2) / (0.05 * x)) ** 2 < 1
    plane = np.where(bone, 700, np.where(body, 40, -1000)).astype(np.int16)
    volume = np.broadcast_to(plane, shape_zyx) + (np.arange(z, dtype=np.int16) % 16)[:, None, None]
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(BIG_SPACING_ZYX_MM[::-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=False)
    return 2 * float(np.prod(shape_zyx)) / MB


def peak_rss(workdir: Path, shape_zyx: tuple[int, int, int]) -> dict:
    """Preprocess one int16 scan of ``shape_zyx`` in a subprocess; its peak RSS (VmHWM) vs its raw size."""
    folder = workdir / f"big-{'x'.join(map(str, shape_zyx))}"
    raw_mb = write_big_scan(folder / "in" / "scan.nii", shape_zyx)
    args = {"input": str(folder / "in"), "output": str(folder / "out"), "target": list(BIG_TARGET_ZYX_MM)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                          check=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])})
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    if child["status"] != "accepted":
        raise RuntimeError(f"the {shape_zyx} benchmark scan was rejected: {child['reason']}")
    peak_mb, before_mb = child["peak_kib"] * 1024 / MB, child["before_kib"] * 1024 / MB
    return {"big_shape_zyx": list(shape_zyx), "big_raw_mb": raw_mb, "big_peak_rss_mb": peak_mb,
            "big_rss_after_imports_mb": before_mb, "peak_rss_ratio": peak_mb / raw_mb,
            "peak_rss_above_imports_ratio": (peak_mb - before_mb) / raw_mb,
            "big_preprocess_s": child["preprocess_s"], "big_read_s": child["read_s"],
            "big_preprocess_vs_read": child["preprocess_s"] / child["read_s"]}


def run(workdir: str | Path | None = None, quick: bool = False) -> dict:
    """All figures of the module docstring as one JSON-able dict (seconds, MB, ratios)."""
    root = scratch(workdir)
    n = 6 if quick else 16
    spacing = None if quick else CORPUS_SPACING_MM
    corpus = root / f"corpus-{n}-{spacing or 'scanner'}mm"
    items = make_corpus(corpus, n, spacing_mm=spacing)
    cfg = PreprocessConfig(input=str(corpus), output=str(root / "out-single"),
                           target_spacing_zyx_mm=(3.0, 3.0, 3.0), log_to_mlflow=False,
                           num_cpus=os.cpu_count() or 1)
    split = time_split(items, cfg, root / "split")  # also warms the page cache for both runs below
    rows, single_s = preprocess_loop(cfg)
    mb = source_mb(rows)
    ray_t = ray_preprocess(cfg.model_copy(update={"output": str(root / "out-ray")}), cfg.num_cpus)
    big = peak_rss(root, (120, 512, 512) if quick else BIG_SHAPE_ZYX)
    return {
        "machine_cores": os.cpu_count(), "volumes": n, "corpus_spacing_mm": spacing or "scanner (~3)",
        "source_mb": mb,
        "accepted_single": sum(r["status"] == "accepted" for r in rows), "accepted_ray": ray_t["ray_accepted"],
        "single_process_s": single_s, "single_volumes_per_s": n / single_s, "single_mb_per_s": mb / single_s,
        "ray_init_s": ray_t["ray_init_s"], "ray_cold_s": ray_t["ray_cold_s"], "ray_warm_s": ray_t["ray_warm_s"],
        "ray_volumes_per_s": n / ray_t["ray_warm_s"], "ray_mb_per_s": mb / ray_t["ray_warm_s"],
        "ray_vs_single_process": single_s / ray_t["ray_warm_s"],
        "ray_vs_single_process_cold": single_s / ray_t["ray_cold_s"],
        **split,
        "preprocess_per_volume_s": single_s / n,
        "other_s_per_volume": max(0.0, single_s / n - sum(split.values())),  # QC, report, manifest: the rest
        "preprocess_vs_read": (single_s / n) / split["read_s_per_volume"],
        **big,
    }
