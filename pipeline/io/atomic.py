"""Atomic file writes: the one way any stage writes an output a reader or a resumed run may see.

``write_atomic(path, write)`` lets ``write`` fill a temporary file beside ``path`` and renames it over ``path``
(``os.replace``, atomic on one filesystem): readers never see half a file and a killed job leaves only a
hidden ``.<name>.tmp-<pid><suffixes>`` behind, which ``pipeline.ingest.resume.remove_partial_files`` deletes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def temporary_path(path: Path) -> Path:
    """``.<name>.tmp-<pid><suffixes>`` beside ``path``: keeps the endings (SimpleITK, matplotlib and numpy pick
    the format, or append one, by them) and matches ``remove_partial_files``'s ``.*.tmp-*``."""
    path = Path(path)
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffixes}")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Create ``path``'s folder, call ``write(tmp)`` with a temporary path beside it, then rename ``tmp`` to
    ``path``. The temporary file is removed when ``write`` raises. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
