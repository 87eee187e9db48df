"""Ray Data adapter of `anatdiff predict`: batch inference with an actor pool, each actor holding one loaded
segmenter (one GPU per actor where the cluster has GPUs, CPUs otherwise), resumable like preprocess.

The work of one input is ``pipeline.predict.scan.predict_unit`` (plain Python, tested without Ray). The driver
discovers the inputs, fetches the model once to check it and take its fingerprint, skips inputs a previous run
finished, streams the rest through the actors with a progress line, and writes the tables.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.config import PredictConfig, UserError
from pipeline.distributed.runtime import init_ray
from pipeline.ingest.resume import remove_partial_files
from pipeline.io.filesystems import prepare_output
from pipeline.predict import segmenter as segmenter_api
from pipeline.predict.inputs import content_key, discover_inputs, load_done, model_fingerprint
from pipeline.predict.report import unaccounted_files, write_tables
from pipeline.predict.scan import PredictOptions, predict_unit, skipped_row


def model_folder(model: str, tracking_uri: str | None) -> tuple[Path, str | None]:
    """(local folder of the model, temporary folder to delete afterwards or None). ``runs:/`` and ``models:/``
    URIs are downloaded through ``pipeline.tracking``; anything else must be a local (or shared) folder."""
    if model.startswith(("runs:/", "models:/")):
        from pipeline import tracking

        tmp = tempfile.mkdtemp(prefix="anatdiff-model-")
        try:
            folder = tracking.download_model(model, tmp, tracking_uri)
            if not folder.is_dir():
                raise UserError(f"model '{model}' is a single file; point it at the folder of a saved segmenter")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder, tmp
    if not os.path.isdir(model):
        what = "is a file, not a folder" if os.path.exists(model) else "does not exist"
        raise UserError(f"model '{model}' {what}: pass a segmenter folder, runs:/<run_id>/<path> or "
                        "models:/<name>@<alias>")
    return Path(os.path.abspath(model)), None


@dataclass(frozen=True)
class PredictJob:
    """Everything an actor needs (pickled to each): the model and its fingerprint, how to load it, where the
    inputs are and where the outputs go."""

    model: str
    tracking_uri: str | None
    fingerprint: str
    factory: Callable
    input_root: str
    out_dir: str
    options: PredictOptions
    torch_threads: int = 0


class Predictor:
    """One model replica: loads the segmenter once, then predicts one input per call. Ray Data runs it as an
    actor (``map_batches`` with batch_size 1); ``map_in_process`` calls it in this process."""

    def __init__(self, job: PredictJob):
        folder, tmp = model_folder(job.model, job.tracking_uri)
        try:
            if model_fingerprint(folder) != job.fingerprint:
                raise UserError(f"model '{job.model}' changed while predict ran (an alias moved, or the folder "
                                "was rewritten); rerun to predict with one model throughout")
            self.segmenter = job.factory(str(folder))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if job.torch_threads and "torch" in sys.modules:   # a torch model: its threads = the actor's CPUs
            sys.modules["torch"].set_num_threads(job.torch_threads)
        self.job = job

    def __call__(self, batch: dict) -> dict:
        """``batch["item"]``: JSON of discovered items, ``batch["key"]``: their content keys -> one JSON list of
        rows per item (``rows_json``)."""
        j = self.job
        out = [json.dumps(predict_unit(json.loads(str(item)), self.segmenter, j.input_root, j.out_dir, str(key),
                                       j.options))
               for item, key in zip(batch["item"], batch["key"])]
        return {"rows_json": np.asarray(out, dtype=object)}


def map_in_process(todo: list[tuple[dict, str]], job: PredictJob, cfg: PredictConfig) -> Iterator[list[dict]]:
    """The rows of each unfinished input, one list per input, predicted in this process (no Ray)."""
    if not todo:
        return
    predictor = Predictor(job)
    for item, key in todo:
        yield json.loads(predictor({"item": [json.dumps(item)], "key": [key]})["rows_json"][0])


def _pool(cfg: PredictConfig, n_todo: int) -> tuple[int, float]:
    """(actors, GPUs per actor) from the config and the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus_total, cpus_total = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus_total >= 1 else 0.0)
    if gpus > gpus_total:
        raise UserError(f"gpus_per_actor {gpus} but the Ray cluster has {gpus_total:g} GPUs; set "
                        "gpus_per_actor=0 to predict on CPUs")
    actors = cfg.num_actors or (int(gpus_total // gpus) if gpus else int(cpus_total // cfg.cpus_per_actor))
    return max(1, min(actors, n_todo)), gpus


def map_ray(todo: list[tuple[dict, str]], job: PredictJob, cfg: PredictConfig) -> Iterator[list[dict]]:
    """The rows of each unfinished input, one list per input as the actors finish them (Ray Data)."""
    if not todo:
        return
    # --- Ray ---------------------------------------------------------------------------------------------
    import ray

    init_ray(cfg.num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line instead
    actors, gpus = _pool(cfg, len(todo))
    ds = ray.data.from_items([{"item": json.dumps(i), "key": k} for i, k in todo], override_num_blocks=len(todo))
    ds.context.op_resource_reservation_enabled = False  # one operator: no CPUs held back for others
    out = ds.map_batches(Predictor, fn_constructor_kwargs={"job": job}, batch_size=1,
                         compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor, num_gpus=gpus)
    for rec in out.iter_rows():
        yield json.loads(rec["rows_json"])
    # ------------------------------------------------------------------------------------------------------


class ProgressLine:
    """``predict: 3/10 inputs (3 predicted, 0 rejected), 4.2 s/input, ETA 0:00:29`` on stderr: rewritten in
    place on a terminal, else one line every ``every_s`` seconds and at the end. Counts only, no names."""

    def __init__(self, total: int, enabled: bool = True, stream=None, every_s: float = 10.0):
        self.total, self.enabled, self.every_s = total, enabled and total > 0, every_s
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.counts, self.start, self.last = 0, {"predicted": 0, "rejected": 0}, time.monotonic(), 0.0

    def text(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = elapsed / self.done if self.done else None
        eta = "?" if rate is None else time.strftime("%H:%M:%S", time.gmtime(rate * (self.total - self.done)))
        per = "" if rate is None else f", {rate:.1f} s/input"
        return (f"predict: {self.done}/{self.total} inputs ({self.counts['predicted']} predicted, "
                f"{self.counts['rejected']} rejected){per}, ETA {eta}")

    def update(self, rows: list[dict]) -> None:
        self.done += 1
        for r in rows:
            if r["status"] in self.counts:
                self.counts[r["status"]] += 1
        now = time.monotonic()
        if self.enabled and (self.tty or now - self.last >= self.every_s or self.done == self.total):
            self.stream.write(("\r" if self.tty else "") + self.text() + ("" if self.tty else "\n"))
            self.stream.flush()
            self.last = now

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _checked_model(cfg: PredictConfig, factory: Callable) -> str:
    """Fetch and load the model once before any actor starts (a bad URI or folder fails here, in one line);
    return its fingerprint."""
    folder, tmp = model_folder(cfg.model, cfg.tracking.tracking_uri)
    try:
        segmenter_api.check_segmenter(factory(str(folder)))
        return model_fingerprint(folder)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run_predict(cfg: PredictConfig, progress: bool = True, segmenter_factory: Callable | None = None,
                map_units: Callable | None = None) -> dict:
    """Predict every input of ``cfg.input`` into ``cfg.output``; return the report (also ``report.json``).

    ``segmenter_factory``: folder -> segmenter (default ``pipeline.evaluation.segmenter.load_segmenter``); it
    travels to the actors pickled, so it must be importable there (a module-level function). ``map_units``:
    how unfinished inputs are processed (default ``map_ray``; ``map_in_process``: a loop in this process).
    Inputs finished by an earlier run with the same content key are reused; leftover temporary files of a
    killed run are deleted first. Every input file ends in exactly one row of ``predictions.csv``.
    """
    inputs = discover_inputs(cfg.input)
    out_dir = prepare_output(cfg.output, cfg.input)
    factory = segmenter_factory or segmenter_api.load_from_folder
    fingerprint = _checked_model(cfg, factory)
    remove_partial_files(out_dir)
    options = PredictOptions(cfg.max_voxels, cfg.overlays, cfg.dicom_seg)
    settings = {"max_voxels": cfg.max_voxels, "overlays": cfg.overlays, "dicom_seg": cfg.dicom_seg}
    keys = {i.item_id: content_key(i.files, inputs.listing, fingerprint, settings) for i in inputs.items}
    done = {i.item_id: load_done(out_dir, i.item_id, keys[i.item_id]) for i in inputs.items}
    todo = [(i.to_dict(), keys[i.item_id]) for i in inputs.items if done[i.item_id] is None]
    rows = [r for rs in done.values() if rs is not None for r in rs]
    model = cfg.model if cfg.model.startswith(("runs:/", "models:/")) else os.path.abspath(cfg.model)
    job = PredictJob(model, cfg.tracking.tracking_uri, fingerprint, factory, inputs.root, str(out_dir), options,
                     max(1, int(cfg.cpus_per_actor)))
    line = ProgressLine(len(todo), enabled=progress)
    for unit_rows in (map_units or map_ray)(todo, job, cfg):
        rows += unit_rows
        line.update(unit_rows)
    line.close()
    rows += [skipped_row(path, reason) for path, reason in inputs.skipped]
    info = {"input": cfg.input.split("?", 1)[0], "model": cfg.model, "model_fingerprint": fingerprint,
            "items": len(inputs.items), "items_reused": len(inputs.items) - len(todo), "items_processed": len(todo),
            "files": {"input": len(inputs.listing), **unaccounted_files(rows, list(inputs.listing))}}
    return write_tables(rows, out_dir, info)


