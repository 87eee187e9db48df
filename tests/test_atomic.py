"""write_atomic: the one atomic write every stage uses (a reader or a resumed run never sees half a file)."""

import numpy as np
import pytest

from pipeline.ingest.resume import remove_partial_files
from pipeline.io.atomic import temporary_path, write_atomic


def test_write_atomic_replaces_the_file_and_creates_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "x.npy"
    assert write_atomic(path, lambda tmp: np.save(tmp, np.arange(3))) == path
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    write_atomic(path, lambda tmp: np.save(tmp, np.arange(5)))
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.npy"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_temporary_names_keep_the_ending_and_are_what_resume_cleans_up(tmp_path):
    assert temporary_path(tmp_path / "x.nii.gz").name.endswith(".nii.gz")
    assert temporary_path(tmp_path / "m.parquet").name.startswith(".m.parquet.tmp-")
    leftover = temporary_path(tmp_path / "sub" / "v.npy")
    leftover.parent.mkdir()
    leftover.write_bytes(b"partial")   # what a killed job leaves behind
    remove_partial_files(tmp_path)
    assert not leftover.exists()
