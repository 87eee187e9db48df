"""``runs:/`` references are parsed in one place (pipeline.tracking.run_id_of)."""

import pytest

from pipeline.config import UserError
from pipeline.distributed.coords import resolve_guide
from pipeline.tracking import run_id_of


@pytest.mark.parametrize("spec, run_id", [
    ("runs:/abc123", "abc123"), ("runs:/abc123/", "abc123"), ("runs:/abc123/guide/guide.pt", "abc123"),
    ("runs:/", ""), ("models:/seg@current", None), ("/data/guide.pt", None), ("", None), (None, None)])
def test_run_id_of(spec, run_id):
    assert run_id_of(spec) == run_id


def test_a_guide_that_is_neither_a_run_nor_a_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither runs:/<run_id> nor a guide.pt file"):
        resolve_guide(str(tmp_path / "missing.pt"), None, tmp_path)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "guide.pt").write_bytes(b"x")
    assert resolve_guide(str(tmp_path / "g"), None, tmp_path) == ((tmp_path / "g" / "guide.pt").resolve(), None)
