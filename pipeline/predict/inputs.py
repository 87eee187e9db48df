"""What predict reads and what it may skip: the inputs (one scan, a folder, s3:// / gs://) through the same
discovery as preprocess, the model's fingerprint, and resume keys and done markers.

Resume: a discovered item is finished when ``OUT/private/done/<item_id>.json`` holds its content key and every
output its rows name exists. The key covers the item's files (relative path, size, mtime from the listing, as
preprocess's), the model's fingerprint (every byte of its folder) and the settings that change the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.config import UserError
from pipeline.ingest import resume
from pipeline.io.filesystems import FileEntry, is_remote, list_files, open_root, remove_tree, shadow_tree
from pipeline.io.layouts import Item, _mhd_data_files, discover_items, image_kind, make_item_id
from pipeline.predict.scan import OUTPUT_FIELDS

KEY_VERSION = "anatdiff-predict-1"


@dataclass(frozen=True)
class Inputs:
    """Discovered inputs: ``root`` (local folder or object-store prefix the items' files are relative to),
    ``items``, ``skipped`` (relative path, reason) and ``listing`` (relative path -> FileEntry)."""

    root: str
    items: list[Item]
    skipped: list[tuple[str, str]]
    listing: dict[str, FileEntry]


def _public(uri: str) -> str:
    return uri.split("?", 1)[0]


def _file_input(root: str, name: str, entry: FileEntry, local_root: Path) -> Inputs:
    """One image file named ``name`` directly under ``root`` (placeholder tree ``local_root`` when remote)."""
    if image_kind(name) is None:
        raise UserError(f"input file '{name}' is not a CT image file (.nii.gz, .nii, .nrrd, .mha, .mhd); "
                        "pass the folder of a DICOM series, or a folder of scans")
    extra = []
    if name.lower().endswith(".mhd"):
        if is_remote(root):
            raise UserError(f"input '{name}': a remote .mhd header needs its data file; pass its folder")
        extra = [p.name for p in _mhd_data_files(local_root / name)]
    files = (name, *extra)
    item = Item(make_item_id(name), name, files, str(local_root / name), None, image_kind(name), root=str(local_root))
    listing = {name: entry}
    for f in extra:
        st = (local_root / f).stat()
        listing[f] = FileEntry(f, st.st_size, st.st_mtime_ns)
    return Inputs(root, [item], [], listing)


def _single_file(uri: str) -> tuple[str, str, FileEntry] | None:
    """(parent root, file name, its entry) when ``uri`` names one file, else None."""
    fs, path = open_root(uri)
    try:
        info = fs.get_file_info(path)
    except OSError:
        return None
    if info.type != pafs.FileType.File:
        return None
    base, query = (uri.split("?", 1) + [""])[:2]
    parent, name = base.rstrip("/").rsplit("/", 1) if "/" in base.rstrip("/") else (".", base)
    parent = parent + (f"?{query}" if query else "")
    return parent, name, FileEntry(name, int(info.size or 0), int(info.mtime_ns or 0))


def discover_inputs(uri: str) -> Inputs:
    """The inputs of ``uri``: one scan file, or a folder / object-store prefix read by
    ``pipeline.io.layouts.discover_items`` (BTCV, nnU-Net/MSD, any folder of scans and DICOM series). Raises
    UserError for a missing input or one without any image."""
    local = not is_remote(uri)
    if local and not os.path.exists(uri):
        raise UserError(f"input '{uri}' does not exist: pass a scan file, a folder of scans, or s3:// / gs://")
    single = _single_file(os.path.abspath(uri) if local else uri)
    if single is not None:
        parent, name, entry = single
        return _file_input(parent, name, entry, Path(parent) if local else Path(tempfile.gettempdir()))
    listing = {e.rel: e for e in list_files(uri)}
    shadow = None if local else tempfile.mkdtemp(prefix="anatdiff-listing-")
    try:
        root = shadow_tree(uri, list(listing.values()), shadow) if shadow else Path(uri)
        try:
            items, skipped = discover_items(root)
        except UserError as e:
            raise UserError(str(e).replace(str(root), _public(uri))) from None
    finally:
        if shadow:
            remove_tree(shadow)
    return Inputs(os.path.abspath(uri) if local else uri, items, skipped, listing)


def model_fingerprint(folder: str | Path) -> str:
    """sha256 hex over every file of a model folder (relative path and bytes): the model's identity."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"\0{path.relative_to(folder).as_posix()}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def content_key(files, listing: dict[str, FileEntry], fingerprint: str, settings: dict) -> str:
    """sha256 hex of an item's files (relative path, size, mtime), the model fingerprint and ``settings``."""
    return resume.files_key(KEY_VERSION, f"\0{fingerprint}\0{json.dumps(settings, sort_keys=True)}", files, listing)


def load_done(out_dir: str | Path, item_id: str, key: str) -> list[dict] | None:
    """The rows of a finished item when its marker holds ``key`` and its outputs exist, else None (the
    preprocess resume rule, ``pipeline.ingest.resume.load_done``, over predict's output files)."""
    return resume.load_done(out_dir, item_id, key, OUTPUT_FIELDS)
