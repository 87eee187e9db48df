"""Dataset layouts: which files of an input folder form which CT item (image + optional label).

Recognized (see docs/dataset-formats.md): the BTCV layout (``img/imgNNNN.nii.gz`` + ``label/labelNNNN.nii.gz``),
the nnU-Net v2 / MSD layout (``dataset.json`` + ``imagesTr/`` + ``labelsTr/``), and any folder of image files
and DICOM folders. Every file under the root ends up either in one item's ``files`` or in ``skipped`` with a
reason, so the manifest can account for every input file.

Discovery opens no image or DICOM file (it also runs on the placeholder shadow tree of an object-store root):
DICOM is recognised by content, in the worker. Every file of a folder that is not an image file by its ending
nor a document, archive or picture (``is_dicom_candidate``) joins the folder's one ``dicom-folder`` item, which
the worker splits into series by reading each file's header once (``pipeline.io.dicom.split_series``); files
without a DICOM header come back as skipped rows. A folder holding a ``DICOMDIR`` (a CD/DVD/USB export) makes
its whole subtree one ``dicom-folder`` item, so that a series spread over several subfolders stays one series.

Item ids (``make_item_id``) carry no part of a file or folder name unless ``readable_ids`` is chosen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.config import UserError
from pipeline.io.filesystems import walk_local

#: file name endings read as one image file each, longest first
IMAGE_ENDINGS: dict[str, str] = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha",
                                 ".mhd": "mha"}
#: endings of files that are never DICOM (documents, archives, pictures, code, other data): skipped at discovery
_NOT_DICOM_SUFFIXES = {
    ".txt", ".json", ".csv", ".tsv", ".md", ".rst", ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".xml", ".html",
    ".htm", ".log", ".ini", ".cfg", ".yaml", ".yml", ".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar",
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".svg", ".py", ".sh", ".bat", ".exe", ".dll",
    ".inf", ".db", ".sqlite", ".npy", ".npz", ".pt", ".pth", ".h5", ".hdf5", ".parquet", ".raw", ".img", ".hdr"}
#: the index file of a DICOM media export; its folder's whole subtree is read as one DICOM item
DICOMDIR_NAME = "dicomdir"
#: prefix of keyed item ids
ID_PREFIX = "ct-"
#: kind of a folder's DICOM files before they are split into series (by the worker)
DICOM_FOLDER = "dicom-folder"
#: optional ``source,patient`` table in the input root (see docs/dataset-formats.md)
PATIENTS_CSV = "patients.csv"


@dataclass(frozen=True)
class Item:
    """One CT to preprocess. Paths in ``source``/``files`` are relative to the input root (POSIX); ``image``
    and ``label`` are local paths under the local folder ``root``. For a DICOM series ``files`` lists its
    slices in reading order (then the label, if any); a ``dicom-folder`` item still has to be split."""

    item_id: str
    source: str
    files: tuple[str, ...]
    image: str
    label: str | None
    kind: str
    series_uid: str | None = None
    root: str = ""

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what Ray Data passes between tasks)."""
        out = asdict(self)
        out["files"] = list(self.files)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Item":
        return cls(**{**d, "files": tuple(str(f) for f in d["files"])})

    def rebased(self, new_root: str | Path) -> "Item":
        """The same item with ``image``/``label`` moved from under ``root`` to under ``new_root`` (where its
        files were downloaded)."""
        def move(p: str | None) -> str | None:
            return None if p is None else str(Path(new_root) / Path(p).relative_to(self.root))
        return replace(self, image=move(self.image), label=move(self.label), root=str(new_root))

    def local_files(self) -> list[str]:
        """Absolute local paths of ``files`` except the label (a DICOM series' slices, in order)."""
        paths = [str(Path(self.root) / f) for f in self.files]
        return [p for p in paths if p != self.label]


def image_kind(name: str) -> str | None:
    """'nifti' / 'nrrd' / 'mha' for an image file name, else None."""
    low = name.lower()
    for ending, kind in IMAGE_ENDINGS.items():
        if low.endswith(ending):
            return kind
    return None


def _strip_ending(name: str) -> str:
    low = name.lower()
    for ending in (*IMAGE_ENDINGS, ".dcm"):
        if low.endswith(ending):
            return name[: -len(ending)]
    return name


def make_item_id(source: str, key: bytes | None = None) -> str:
    """The id of the item at ``source`` (relative path; ``folder#series`` for one series of a folder).

    With ``key`` (what the preprocess job uses: a random key kept in ``OUT/private/``): ``ct-`` + 16 hex digits
    of HMAC-SHA256(key, source), so no part of a file or folder name (often a patient's name or accession
    number) reaches an output name, MLflow or a log, and the name cannot be guessed back without the key.
    Without ``key`` (``readable_ids: true``, for public data): ``<stem>-<8 hex of sha1(source)>``.
    Deterministic and unique per source either way.
    """
    if key is not None:
        return ID_PREFIX + hmac.new(key, source.encode(), hashlib.sha256).hexdigest()[:16]
    stem = _strip_ending(Path(source.split("#")[0]).name) or "root"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "item"
    return f"{stem[:60]}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def derived_item_id(parent: "Item", part: str) -> str:
    """The id of ``part`` (a series label) of the discovered item ``parent``: readable when ``parent``'s id
    is, else ``ct-`` + 16 hex of sha256(parent id + part), as unguessable as the keyed parent id."""
    if parent.item_id == make_item_id(parent.source):
        return make_item_id(f"{parent.source}#{part}")
    return ID_PREFIX + hashlib.sha256(f"{parent.item_id}#{part}".encode()).hexdigest()[:16]


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def _mhd_data_files(mhd: Path) -> list[Path]:
    """The detached pixel file(s) a MetaImage header names (``ElementDataFile``), if they exist."""
    for line in mhd.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            value = value.strip()
            data = mhd.parent / value
            return [data] if value.upper() not in ("LOCAL", "LIST") and data.is_file() else []
    return []


def is_dicom_candidate(name: str) -> bool:
    """A file that may hold DICOM, decided later from its content: any name except hidden files, image files
    (``.nii``, ``.nrrd``, ...), ``patients.csv`` and the endings of documents, archives and pictures. Exports
    name slices ``IM0001``, by their SOP Instance UID (``1.3.12.2.1107.5.1.4.12345``, ``CT.1.2.840...``),
    ``*.dcm``, ``*.ima``, or anything else."""
    return not (name.startswith(".") or image_kind(name) or name == PATIENTS_CSV
                or Path(name.lower()).suffix in _NOT_DICOM_SUFFIXES)


def _file_item(root: Path, image: Path, label: Path | None, extra: list[Path] = ()) -> Item:
    source = _rel(image, root)
    files = [source] + [_rel(p, root) for p in extra] + ([_rel(label, root)] if label else [])
    kind = image_kind(image.name) or "dicom"
    return Item(make_item_id(source), source, tuple(files), str(image), str(label) if label else None, kind,
                root=str(root))


def _dicom_folder_item(root: Path, folder: Path, files: list[Path], label: Path | None = None) -> list[Item]:
    """The DICOM candidate ``files`` of ``folder`` as one unsplit item (none if there are no files)."""
    if not files:
        return []
    source = _rel(folder, root)
    rel_files = [_rel(f, root) for f in sorted(files)] + ([_rel(label, root)] if label else [])
    return [Item(make_item_id(source), source, tuple(rel_files), str(folder), str(label) if label else None,
                 DICOM_FOLDER, root=str(root))]


def _btcv_items(root: Path, base: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """BTCV in ``base``: ``img/imgNNNN.nii.gz`` paired with ``label/labelNNNN.nii.gz`` by number."""
    img_dir, label_dir = base / "img", base / "label"
    if not (img_dir.is_dir() and label_dir.is_dir()):
        return [], []
    labels = {m.group(1): p for p in sorted(label_dir.iterdir())
              if (m := re.fullmatch(r"label(\d+)\.nii(\.gz)?", p.name)) and p.is_file()}
    items, used = [], set()
    for p in sorted(img_dir.iterdir()):
        if (m := re.fullmatch(r"img(\d+)\.nii(\.gz)?", p.name)) and p.is_file():
            label = labels.get(m.group(1))
            used.add(label)
            items.append(_file_item(root, p, label))
    if not items:
        return [], []
    skipped = [(_rel(p, root), "label without image (no img/imgNNNN with its number)")
               for p in labels.values() if p not in used]
    return items, skipped


def _listed_path(root: Path, entry: object, ds: Path) -> Path:
    if not isinstance(entry, str):
        raise UserError(f"{ds}: 'training' entries need 'image'/'label' paths as strings, got {entry!r}")
    return Path(os.path.normpath(root / entry))


def _nnunet_items(root: Path, base: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """nnU-Net v2 / MSD in ``base``: ``dataset.json`` + ``imagesTr/`` (+ ``labelsTr/``)."""
    ds = base / "dataset.json"
    if not (ds.is_file() and (base / "imagesTr").is_dir()):
        return [], []
    try:
        meta = json.loads(ds.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{ds}: not valid JSON ({e}); fix or remove it") from None
    skipped = [(_rel(ds, root), "layout metadata (dataset.json)")]
    pairs: list[tuple[Path, Path | None]] = []
    if isinstance(meta.get("training"), list) and meta["training"]:
        for entry in meta["training"]:
            if not isinstance(entry, dict):
                raise UserError(f"{ds}: 'training' must list {{image, label}} objects, got {entry!r}")
            img = _listed_path(base, entry.get("image"), ds)
            label = _listed_path(base, entry["label"], ds) if entry.get("label") else None
            if any(p is not None and root not in p.parents for p in (img, label)):
                raise UserError(f"{ds}: training entry {entry} points outside the input folder '{root}'")
            if not img.exists():
                skipped.append((str(entry.get("image")), "listed in dataset.json but missing on disk"))
                continue
            pairs.append((img, label if label is not None and label.exists() else None))
    else:
        ending = str(meta.get("file_ending", ".nii.gz"))
        for p in sorted((base / "imagesTr").iterdir()):
            if p.is_dir() or p.name.endswith("_0000" + ending):
                case = p.name.removesuffix(ending).removesuffix("_0000")
                label = base / "labelsTr" / f"{case}{ending}"
                pairs.append((p, label if label.is_file() else None))
            elif re.fullmatch(r".+_\d{4}" + re.escape(ending), p.name):
                skipped.append((_rel(p, root), "extra input channel (only channel _0000 is read as CT)"))
    items = []
    for img, label in pairs:
        items.extend(_dicom_folder_item(root, img, [p for p in sorted(img.iterdir()) if p.is_file()
                                                    and is_dicom_candidate(p.name)], label)
                     if img.is_dir() else [_file_item(root, img, label)])
    used = {i.label for i in items}
    if (base / "labelsTr").is_dir():
        skipped += [(_rel(p, root), "label without image in dataset.json / imagesTr")
                    for p in sorted((base / "labelsTr").iterdir()) if p.is_file() and str(p) not in used]
    return items, skipped


_LABEL_FOLDERS = {"label", "labels", "labelstr", "labelsts", "segmentations", "masks"}


def _skip_reason(name: str, folder_name: str) -> str:
    if name.startswith("."):
        return "hidden file"
    if folder_name.lower() in _LABEL_FOLDERS and image_kind(name):
        return f"label-like file in '{folder_name}/' outside a BTCV or dataset.json layout"
    suffix = "".join(Path(name).suffixes[-2:]) or "no extension"
    return f"not an image file ({suffix})"


def _folder_items(root: Path, folder: Path, names: list[str], accounted: set[str]
                  ) -> tuple[list[Item], list[tuple[str, str]]]:
    """Image files and DICOM series directly in ``folder`` whose files no layout has claimed yet."""
    todo = [folder / n for n in names if _rel(folder / n, root) not in accounted]
    items, skipped = [], []
    for mhd in (p for p in todo if p.name.lower().endswith(".mhd") and not p.name.startswith(".")):
        items.append(_file_item(root, mhd, None, _mhd_data_files(mhd)))
    accounted = accounted | {f for i in items for f in i.files}
    todo = [p for p in todo if _rel(p, root) not in accounted]
    items += _dicom_folder_item(root, folder, [p for p in todo if is_dicom_candidate(p.name)])
    accounted = accounted | {f for i in items for f in i.files}
    for p in todo:
        rel = _rel(p, root)
        if rel in accounted:
            continue
        reason = _skip_reason(p.name, folder.name)
        if rel == PATIENTS_CSV:
            skipped.append((rel, "patient mapping (patients.csv)"))
        elif image_kind(p.name) and not reason.startswith(("hidden", "label-like")):
            items.append(_file_item(root, p, None))
        else:
            skipped.append((rel, reason))
    return items, skipped


def _dicomdir_items(root: Path, tree: list, accounted: set[str]) -> list[Item]:
    """One ``dicom-folder`` item per folder holding a ``DICOMDIR``: every DICOM candidate of its subtree."""
    items = []
    for folder, _, names, _ in tree:
        if not any(n.lower() == DICOMDIR_NAME for n in names) or _rel(folder, root) in accounted:
            continue
        inside = [Path(f) / n for f, _, ns, _ in tree if f == folder or folder in Path(f).parents for n in ns
                  if is_dicom_candidate(n)]
        found = [i for i in _dicom_folder_item(root, folder, [p for p in inside if _rel(p, root) not in accounted])
                 if not accounted & set(i.files)]
        items += found
        accounted |= {f for i in found for f in i.files}
    return items


def discover_items(input_root: str | Path, id_key: bytes | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items (image + optional label) under ``input_root`` and the files skipped, as (relative path, reason).

    In every folder (top-down) the BTCV and nnU-Net v2 / MSD layouts are tried first; files they do not claim
    (e.g. ``imagesTs/``) are read as a plain folder. Every file under the root appears in exactly one item's
    ``files`` or in ``skipped`` (symbolic link loops, fifos and other entries ``walk_local`` reports among
    them). ``id_key``: see ``make_item_id`` (None: readable ids).
    Raises UserError when the folder is missing or holds no image.
    """
    root = Path(os.path.abspath(input_root))
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"input folder '{input_root}' {what}: pass a folder of CT images (--input)")
    tree = list(walk_local(root))
    items, skipped, accounted = [], [], set()
    items += _dicomdir_items(root, tree, accounted)
    accounted |= {f for i in items for f in i.files}
    for folder, _, names, special in tree:
        skipped += [(_rel(folder / n, root), reason) for n, reason in special]
        accounted |= {_rel(folder / n, root) for n, _ in special}
        for find in (_btcv_items, _nnunet_items, None):
            found, skip = (find(root, Path(folder)) if find else
                           _folder_items(root, Path(folder), names, accounted))
            found = [i for i in found if not accounted & set(i.files)]
            items, skipped = items + found, skipped + [s for s in skip if s[0] not in accounted]
            accounted |= {f for i in found for f in i.files} | {s for s, _ in skip}
    if not items:
        raise UserError(f"input folder '{input_root}' holds no CT image (looked for "
                        f"{', '.join(IMAGE_ENDINGS)} files and DICOM series; {len(skipped)} other files)")
    if id_key is not None:
        items = [replace(i, item_id=make_item_id(i.source, id_key)) for i in items]
    return sorted(items, key=lambda i: i.source), sorted(skipped)
