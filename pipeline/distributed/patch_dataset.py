"""Random patches as a Ray Data dataset: (step, rank, slot) descriptors mapped to memory-mapped cuts.

The dataset is ``ray.data.range`` over one row per patch; a ``map_batches`` actor (``PatchCutter``) opens the
volumes of ``manifest.parquet`` once by memory map and turns each descriptor into the patch that
``pipeline.data.patches.sample_patch`` cuts (centre inside the body mask, HU window applied here). Patch
(rank, step, slot) is a pure function of ``(seed, rank, step, slot)``, whatever the block layout or the
number of actors, and every rank owns exactly ``steps_per_epoch * batch_size`` rows, so every rank gets
exactly ``steps_per_epoch`` full batches (DDP never sees unequal batch counts).

Two ways to consume it:
- deterministic: each Train worker builds ``patch_dataset(..., ranks=[rank])`` and reads it with
  ``rank_batches`` (order preserved: batch i is step ``start_step + i``);
- shared: the driver builds one dataset for all ranks and ``equal_shards`` (``streaming_split(equal=True)``,
  what Ray Train does with ``datasets=``) deals rows to workers as they are ready: equal counts, but which
  rows a worker gets depends on timing.

When to use it rather than the per-worker ``PatchStream``: when cutting patches costs more than the train
step (GPU training, many augmentations, volumes on slow storage) and other CPUs (on the Train node or other
nodes) can do it. On a CPU-only node, where the Train workers already use the cores, ``PatchStream`` in the
worker is cheaper (no object-store copy, no actor); see docs/benchmarks.md for the measurement.
Memory per actor is bounded: memory maps (page cache, not heap), each volume's body box and one block of
patches; ``foreground_prob > 0`` also caches each labelled volume's organ voxel indices.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.config import UserError
from pipeline.data.patches import load_volume_refs, sample_patch

#: descriptor columns carried next to the patch arrays in every row
DESCRIPTOR_KEYS = ("rank", "step", "slot", "volume_index")


def volume_weights(scanner_keys: Sequence[str], balance_scanners: bool) -> np.ndarray:
    """(N,) float64 probabilities of drawing each volume: uniform, or equal per ``scanner_key`` when balancing.

    With balancing, a scanner with k volumes gives each of them 1 / (k * number of scanners).
    """
    keys = list(scanner_keys)
    if not keys:
        raise ValueError("volume_weights got no volumes")
    weights = np.ones(len(keys))
    if balance_scanners:
        counts = {k: keys.count(k) for k in set(keys)}
        weights = np.array([1.0 / counts[k] for k in keys])
    return weights / weights.sum()


def decode_descriptors(ids: np.ndarray, ranks: Sequence[int], start_step: int, steps_per_epoch: int,
                       batch_size: int) -> dict[str, np.ndarray]:
    """Row ids (int64, 0 .. len(ranks) * steps_per_epoch * batch_size - 1) -> ``rank``, ``step``, ``slot``.

    Rows are rank-major, then step, then slot: rows of one rank are contiguous and in step order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    per_rank = steps_per_epoch * batch_size
    if ids.size and (ids.min() < 0 or ids.max() >= len(ranks) * per_rank):
        raise ValueError(f"descriptor ids must lie in [0, {len(ranks) * per_rank}), got {ids.min()}..{ids.max()}")
    return {"rank": np.asarray(ranks, dtype=np.int64)[ids // per_rank],
            "step": start_step + (ids % per_rank) // batch_size,
            "slot": ids % batch_size}


class PatchCutter:
    """``map_batches`` UDF: descriptors ``{"id": (n,) int64}`` -> n patches (one actor keeps the refs open).

    Output columns: ``image`` (n, 1, D, H, W) float32 in [0, 1], ``coords`` (n, 3, D, H, W) float32,
    ``mask`` (n, D, H, W) bool, ``start`` (n, 3) int64 (z, y, x voxels), ``label`` (n, D, H, W) int64 when every
    volume is labelled, and the descriptor columns ``rank``, ``step``, ``slot``, ``volume_index`` (int64).
    """

    def __init__(self, data_dir: str, patch_size_zyx, window_hu, seed: int, ranks: Sequence[int],
                 start_step: int, steps_per_epoch: int, batch_size: int, balance_scanners: bool,
                 foreground_prob: float, coords_dir: str | None):
        self.refs = load_volume_refs(data_dir, coords_dir=coords_dir)
        self.p = volume_weights([r.scanner_key for r in self.refs], balance_scanners)
        self.with_label = all(r.label_path is not None for r in self.refs)
        self.size, self.window = tuple(patch_size_zyx), tuple(window_hu)
        self.seed, self.foreground_prob = seed, foreground_prob
        self.layout = (list(ranks), start_step, steps_per_epoch, batch_size)

    def cut(self, rank: int, step: int, slot: int) -> dict[str, np.ndarray]:
        """The patch of one descriptor: a pure function of (seed, rank, step, slot)."""
        rng = np.random.default_rng([self.seed, rank, step, slot])
        index = int(rng.choice(len(self.refs), p=self.p))
        patch = sample_patch(self.refs[index], self.size, self.window, rng, self.foreground_prob)
        if not self.with_label:
            patch.pop("label", None)
        return patch | {"volume_index": np.int64(index)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        desc = decode_descriptors(batch["id"], *self.layout)
        rows = [self.cut(int(r), int(s), int(k)) for r, s, k in zip(desc["rank"], desc["step"], desc["slot"])]
        out = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        return out | {k: desc[k] for k in ("rank", "step", "slot")}


def _check_layout(patch_size_zyx, window_hu, batch_size: int, steps_per_epoch: int, num_workers: int,
                  ranks: Sequence[int]) -> None:
    """UserError naming the argument, the value received and what is allowed."""
    if len(patch_size_zyx) != 3 or any(int(s) < 1 for s in patch_size_zyx):
        raise UserError(f"patch_size_zyx must be 3 positive voxel counts (z, y, x), got {tuple(patch_size_zyx)}")
    if len(window_hu) != 2 or window_hu[0] >= window_hu[1]:
        raise UserError(f"window_hu must be (low, high) with low < high, got {tuple(window_hu)}")
    for name, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch),
                        ("num_workers", num_workers)):
        if int(value) < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not ranks or any(r < 0 or r >= num_workers for r in ranks) or len(set(ranks)) != len(ranks):
        raise UserError(f"ranks must be distinct ranks in 0..{num_workers - 1} (num_workers {num_workers}), "
                        f"got {list(ranks)}")


def patch_dataset(data_dir: str | Path, patch_size_zyx, window_hu, batch_size: int, steps_per_epoch: int,
                  num_workers: int, seed: int = 0, *, ranks: Sequence[int] | None = None, start_step: int = 0,
                  balance_scanners: bool = False, foreground_prob: float = 0.0,
                  coords_dir: str | Path | None = None, concurrency: int = 1, cpus_per_actor: float = 0.5,
                  rows_per_block: int | None = None):
    """A ``ray.data.Dataset`` with one row per patch of steps ``start_step .. start_step + steps_per_epoch``.

    ``ranks`` (default: all of ``range(num_workers)``) chooses whose rows the dataset holds: a Train worker
    passes ``[its rank]``. Row order (preserved) is rank, step, slot. ``concurrency`` actors of
    ``cpus_per_actor`` CPUs each cut patches (fractional CPUs leave room beside Train workers; see the
    deadlock pitfall in docs/troubleshooting.md); blocks hold ``rows_per_block`` patches (default
    ``batch_size``). Columns: see ``PatchCutter``. Raises UserError on a bad argument or a missing corpus
    (checked here, before any Ray task starts).
    """
    import ray

    ranks = list(range(num_workers)) if ranks is None else [int(r) for r in ranks]
    _check_layout(patch_size_zyx, window_hu, batch_size, steps_per_epoch, num_workers, ranks)
    load_volume_refs(data_dir)  # a missing or empty manifest fails here, in the caller's process
    n_rows = len(ranks) * steps_per_epoch * batch_size
    rows_per_block = rows_per_block or batch_size
    # --- Ray ---------------------------------------------------------------------------------------------
    ds = ray.data.range(n_rows, override_num_blocks=max(1, -(-n_rows // rows_per_block)))
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    # Ray Data holds half the CPUs back per operator by default (room for other operators); here that left
    # the cutters starved: 61 vs 268 patches/s per core (benchmark patches --quick, 2 cores)
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        PatchCutter, batch_size=rows_per_block, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor, fn_constructor_kwargs=dict(
            data_dir=str(data_dir), patch_size_zyx=tuple(patch_size_zyx), window_hu=tuple(window_hu),
            seed=seed, ranks=ranks, start_step=start_step, steps_per_epoch=steps_per_epoch,
            batch_size=batch_size, balance_scanners=balance_scanners, foreground_prob=foreground_prob,
            coords_dir=None if coords_dir is None else str(coords_dir)))


def rank_batches(source, batch_size: int, prefetch_batches: int = 1,
                 keep_descriptors: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Full batches (drop_last) of a Dataset or a ``DataIterator`` shard, as numpy dicts shaped like
    ``PatchStream.batch`` (``image`` (B, 1, D, H, W) float32, ``coords``, ``mask``, ``start``[, ``label``]).

    ``prefetch_batches`` bounds what waits in the worker's memory. Descriptor columns are dropped unless
    ``keep_descriptors``.
    """
    for batch in source.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                     prefetch_batches=prefetch_batches):
        if not keep_descriptors:
            batch = {k: v for k, v in batch.items() if k not in DESCRIPTOR_KEYS}
        yield batch


def equal_shards(ds, num_workers: int) -> list:
    """``num_workers`` ``DataIterator`` shards with equal row counts (``streaming_split(equal=True)``).

    The shards must be read concurrently (one per Train worker or thread). A dataset of all ranks holds
    ``num_workers * steps_per_epoch * batch_size`` rows, so each shard yields ``steps_per_epoch`` full batches.
    """
    return ds.streaming_split(num_workers, equal=True)


@contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[float]:
    """Ray for a benchmark or a script: the running instance, else ``init_ray(num_cpus)`` (shut down on exit).

    Yields the seconds ``ray.init`` took (0.0 when Ray was already running).
    """
    import ray

    from pipeline.distributed.runtime import init_ray

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    init_ray(num_cpus)
    try:
        yield time.perf_counter() - t0 if started_here else 0.0
    finally:
        if started_here:
            ray.shutdown()
