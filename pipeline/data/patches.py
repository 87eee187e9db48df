"""Random patches cut from preprocessed volumes by memory map, with the intensity window applied here.

The stream is a pure function of (seed, rank, step): a resumed run sees exactly the batches it would have
seen, and every worker takes the same number of batches per step (what DDP needs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import UserError
from pipeline.data.conditioning import bodybox_coords
from pipeline.data.inputs import PAD_HU, body_bbox_zyx, scale_hu


def volume_digest(volume_zyx: np.ndarray, spacing_zyx_mm) -> str:
    """Hex digest of a preprocessed volume's shape, spacing and middle axial slice. Keyed item ids are new each
    time a corpus is preprocessed (a random key per output folder); this is not, so splits, probe cases, bank
    windows and the order volumes are read in follow it. Reads one slice of a memory map."""
    h = hashlib.blake2b(digest_size=16)
    h.update((",".join(str(int(n)) for n in volume_zyx.shape) + "|" +
              ",".join(f"{float(s):.6g}" for s in spacing_zyx_mm)).encode())
    h.update(np.ascontiguousarray(volume_zyx[volume_zyx.shape[0] // 2]).tobytes())
    return h.hexdigest()


@dataclass
class VolumeRef:
    """One preprocessed volume on disk (paths absolute)."""

    item_id: str
    image_path: Path
    mask_path: Path | None
    label_path: Path | None
    shape_zyx: tuple[int, int, int]
    scanner_key: str = "unknown"
    patient_key: str | None = None
    spacing_zyx_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_xyz_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    coords_path: Path | None = None
    digest: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _memmap(self, name: str, path: Path | None) -> np.ndarray | None:
        """``path`` opened once as a read-only memory map (None when the file does not exist for this item)."""
        if path is None:
            return None
        if name not in self._cache:
            self._cache[name] = np.load(path, mmap_mode="r")
        return self._cache[name]

    def image(self) -> np.ndarray:
        return self._memmap("image", self.image_path)

    def mask(self) -> np.ndarray | None:
        return self._memmap("mask", self.mask_path)

    def label(self) -> np.ndarray | None:
        return self._memmap("label", self.label_path)

    def coords(self) -> np.ndarray | None:
        """The learned guide's (3, D, H, W) map, when one was computed for this volume."""
        return self._memmap("coords", self.coords_path)

    def content_digest(self) -> str:
        """``volume_digest`` of this volume: the manifest's ``volume_digest`` when preprocessing wrote one, else
        computed here (one slice read)."""
        if self.digest is None:
            self.digest = volume_digest(self.image(), self.spacing_zyx_mm)
        return self.digest

    def body_bbox_zyx(self) -> tuple[tuple[int, int], ...]:
        """Inclusive (first, last) voxel of the body along z, y, x (whole volume without a mask)."""
        if "bbox" not in self._cache:
            mask = self.mask()
            self._cache["bbox"] = tuple((0, s - 1) for s in self.shape_zyx) if mask is None else \
                body_bbox_zyx(mask)
        return self._cache["bbox"]


def content_names(refs: list[VolumeRef]) -> list[str]:
    """Per ref, a name that sorts the same way every time the same data is preprocessed (keyed item ids do not):
    its ``content_digest``, with ``item_id`` appended only to tell identical volumes apart."""
    digests = [r.content_digest() for r in refs]
    twice = {d for d in digests if digests.count(d) > 1}
    return [f"{d}.{r.item_id}" if d in twice else d for d, r in zip(digests, refs)]


def in_content_order(refs: list[VolumeRef]) -> list[VolumeRef]:
    """``refs`` sorted by ``content_names``."""
    return [r for _, r in sorted(zip(content_names(refs), refs), key=lambda pair: pair[0])]


def load_volume_refs(data_dir: str | Path, require_labels: bool = False,
                     coords_dir: str | Path | None = None) -> list[VolumeRef]:
    """Accepted items of ``data_dir/manifest.parquet`` as VolumeRefs in content order (``in_content_order``:
    the same order whenever the same scans are preprocessed again, whatever ids they got).

    ``coords_dir``: folder of learned-guide coordinate maps ``<item_id>.npy`` (see distributed/coords.py).
    """
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.parquet"
    if not manifest.is_file():
        raise UserError(f"no manifest.parquet in '{data_dir}': run `anatdiff preprocess` on the corpus first")
    df = pd.read_parquet(manifest)
    df = df[df["status"] == "accepted"].sort_values("item_id")
    if require_labels:
        df = df[df["label_path"].notna()]
    if df.empty:
        what = "accepted labelled" if require_labels else "accepted"
        raise UserError(f"'{manifest}' lists no {what} volumes")

    def opt(p):
        return None if p is None or (isinstance(p, float) and np.isnan(p)) else data_dir / p

    refs = []
    for row in df.itertuples():
        refs.append(VolumeRef(
            item_id=row.item_id, image_path=data_dir / row.image_path,
            mask_path=opt(getattr(row, "mask_path", None)), label_path=opt(row.label_path),
            shape_zyx=tuple(int(s) for s in row.shape),
            scanner_key=str(getattr(row, "scanner_key", "unknown") or "unknown"),
            patient_key=getattr(row, "patient_key", None),
            spacing_zyx_mm=tuple(float(v) for v in row.target_spacing_mm),
            origin_xyz_mm=tuple(float(v) for v in row.origin_xyz_mm),
            coords_path=None if coords_dir is None else Path(coords_dir) / f"{row.item_id}.npy",
            digest=getattr(row, "volume_digest", None) or None))
    return in_content_order(refs)


def cut_patch(volume_zyx: np.ndarray, start_zyx: np.ndarray, size_zyx: tuple[int, int, int],
              fill) -> np.ndarray:
    """Copy ``volume_zyx[start : start + size]``, padding with ``fill`` where the window leaves the volume.

    Reads only the window from a memory-mapped array.
    """
    start = np.asarray(start_zyx, dtype=int)
    size = np.asarray(size_zyx, dtype=int)
    shape = np.asarray(volume_zyx.shape)
    out = np.full(tuple(size), fill, dtype=volume_zyx.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, shape)
    if np.any(hi <= lo):
        return out
    src = tuple(slice(a, b) for a, b in zip(lo, hi))
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    out[dst] = volume_zyx[src]
    return out


def organ_voxels(ref: VolumeRef) -> dict[int, np.ndarray]:
    """Label value -> (N, 3) int64 zyx indices of its voxels, for every organ present (cached per volume)."""
    if "organ_voxels" not in ref._cache:
        label = np.asarray(ref.label())
        flat = np.flatnonzero(label)
        values = label.reshape(-1)[flat]
        order = np.argsort(values, kind="stable")
        flat, values = flat[order], values[order]
        present, starts = np.unique(values, return_index=True)
        groups = np.split(flat, starts[1:])
        ref._cache["organ_voxels"] = {int(v): np.stack(np.unravel_index(g, label.shape), axis=1)
                                      for v, g in zip(present, groups)}
    return ref._cache["organ_voxels"]


def _random_start(ref: VolumeRef, size_zyx, rng: np.random.Generator, foreground: bool,
                  jitter: float = 0.0) -> np.ndarray:
    """Patch start so that its centre is a body voxel, or, when ``foreground``, a voxel of an organ drawn
    uniformly among the organs present (class first, then voxel: MONAI's RandCropByLabelClasses), so that
    small organs (adrenals, gallbladder) are centred as often as the liver. ``jitter``: the organ voxel is
    moved off the centre by up to that fraction of the patch size per axis (sliding windows see organs
    anywhere in a window, not only in its middle)."""
    size = np.asarray(size_zyx)
    organs = organ_voxels(ref) if foreground and ref.label_path is not None else {}
    if organs:
        voxels = organs[list(organs)[rng.integers(len(organs))]]
        reach = (size * jitter).astype(int)
        return voxels[rng.integers(len(voxels))] - size // 2 + rng.integers(-reach, reach + 1)
    box = ref.body_bbox_zyx()
    mask = ref.mask()
    centre = None
    for _ in range(20):
        centre = np.array([rng.integers(lo, hi + 1) for lo, hi in box])
        if mask is None or mask[tuple(centre)]:
            break
    return centre - size // 2


def patch_coords(ref: VolumeRef, start_zyx, size_zyx) -> np.ndarray:
    """(3, D, H, W) float32 guide coordinates of a patch: the learned map when present, else the body box.

    One padding rule for both sources: voxels of the patch outside the volume get 0 in every channel (what
    the sliding window pads with at inference), so body-box coordinates are not extrapolated past the
    volume's edge. Inside the volume, body-box coordinates outside the body's box do leave [0, 1].
    """
    cmap = ref.coords()
    if cmap is not None:
        return np.stack([cut_patch(cmap[c], start_zyx, size_zyx, 0) for c in range(3)]).astype(np.float32)
    coords = bodybox_coords(size_zyx, ref.body_bbox_zyx(), start_zyx)
    inside = [(np.arange(s, s + n) >= 0) & (np.arange(s, s + n) < dim)
              for s, n, dim in zip(np.asarray(start_zyx, dtype=int), size_zyx, ref.shape_zyx)]
    coords[:, ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])] = 0.0
    return coords


def sample_patch(ref: VolumeRef, size_zyx, window_hu, rng: np.random.Generator,
                 foreground_prob: float = 0.0, jitter: float = 0.0) -> dict[str, np.ndarray]:
    """One patch: ``image`` (1, D, H, W) in [0, 1], ``coords`` (3, D, H, W) body-box, ``mask`` (D, H, W)
    bool, and ``label`` (D, H, W) int64 when the volume is labelled."""
    foreground = ref.label_path is not None and rng.random() < foreground_prob
    start = _random_start(ref, size_zyx, rng, foreground, jitter)
    out = {
        "image": scale_hu(cut_patch(ref.image(), start, size_zyx, PAD_HU), window_hu)[None],
        "coords": patch_coords(ref, start, size_zyx),
        "start": start.astype(np.int64),
    }
    mask = ref.mask()
    out["mask"] = (cut_patch(mask, start, size_zyx, 0) > 0) if mask is not None else \
        np.ones(size_zyx, dtype=bool)
    if ref.label_path is not None:
        out["label"] = cut_patch(ref.label(), start, size_zyx, 0).astype(np.int64)
    return out


class PatchStream:
    """Deterministic batches of random patches for one worker of ``world_size``.

    ``batch(step)`` depends only on (seed, rank, step); volumes are drawn uniformly, or balanced over
    ``scanner_key`` when ``balance_scanners``. Besides ``sample_patch``'s arrays a batch holds
    ``volume_index`` (B,) int64: the index in ``refs`` each patch was cut from.
    """

    def __init__(self, refs: list[VolumeRef], patch_size_zyx, window_hu, seed: int = 0, rank: int = 0,
                 foreground_prob: float = 0.0, balance_scanners: bool = False, jitter: float = 0.0):
        if not refs:
            raise UserError("the patch stream got no volumes")
        self.refs, self.size, self.window = refs, tuple(patch_size_zyx), tuple(window_hu)
        self.seed, self.rank, self.foreground_prob, self.jitter = seed, rank, foreground_prob, jitter
        weights = np.ones(len(refs))
        if balance_scanners:
            keys = [r.scanner_key for r in refs]
            counts = {k: keys.count(k) for k in set(keys)}
            weights = np.array([1.0 / counts[k] for k in keys])
        self.p = weights / weights.sum()

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        picks = rng.choice(len(self.refs), size=batch_size, p=self.p)
        patches = [sample_patch(self.refs[i], self.size, self.window, rng, self.foreground_prob, self.jitter)
                   for i in picks]
        return {k: np.stack([p[k] for p in patches]) for k in patches[0]} | {"volume_index": picks.astype(np.int64)}
