"""Ids without names, paths only in private/, patient keys under the user's secret, and when that secret is
required (in-process jobs, no Ray)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_factory import write_ct_series
from pipeline.config import PreprocessConfig, UserError
from pipeline.distributed.ingest import map_units_in_process, run_preprocess
from pipeline.ingest.manifest import read_manifest
from pipeline.ingest.phi import PUBLIC_KEY, patient_key, resolve_secret
from pipeline.io.layouts import discover_items

REAL_CHEST = Path(__file__).parent / "data" / "real-ct" / "chest"
NAME = "DOE_JOHN_MRN-123456"
SECRET = "0123456789abcdef-test"


def _body(n_z=10) -> np.ndarray:
    vol = np.full((n_z, 24, 24), -1000, np.int16)
    vol[:, 3:21, 3:21] = 40
    return vol


def _nifti(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _run(inp: Path, out: Path, **kw):
    cfg = PreprocessConfig(input=str(inp), output=str(out), log_to_mlflow=False,
                           target_spacing_zyx_mm=(2.0, 2.0, 2.0), **kw)
    return run_preprocess(cfg, progress=False, map_units=map_units_in_process)


@pytest.fixture(autouse=True)
def no_secret(monkeypatch):
    for var in ("ANATDIFF_PHI_SECRET", "ANATDIFF_PHI_SECRET_FILE", "ANATDIFF_PHI_SALT"):
        monkeypatch.delenv(var, raising=False)


def test_ids_carry_no_name_and_paths_stay_in_private(tmp_path):
    inp = tmp_path / "in"
    _nifti(inp / NAME / f"{NAME}_ct.nii.gz", _body())
    write_ct_series(inp / NAME / "series", _body() + 1024, intercept=-1024,
                    names=[f"{NAME}_{k}.dcm" for k in range(10)])
    write_ct_series(inp / NAME / "series", _body(9) + 1024, intercept=-1024, names=[f"b{k}.dcm" for k in range(9)])
    (inp / NAME / f"{NAME}.txt").write_text("notes")
    df = _run(inp, tmp_path / "out")
    assert list(df["status"]).count("accepted") == 3 and list(df["status"]).count("skipped") == 1
    assert all(re.fullmatch(r"ct-[0-9a-f]{16}", i) for i in df.loc[df.status != "skipped", "item_id"])
    assert all(re.fullmatch(r"file-[0-9a-f]{16}", i) for i in df.loc[df.status == "skipped", "item_id"])
    assert df["source"].isna().all() and not any(len(f) for f in df["files"])
    public = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and "private" not in p.parts]
    assert not [str(p) for p in public if "DOE" in str(p) or b"DOE" in p.read_bytes()]
    private = tmp_path / "out" / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / "id_key").stat().st_mode) == 0o600
    mapping = (private / "sources.csv").read_text()
    assert mapping.count(NAME) >= 12 and all(i in mapping for i in df["item_id"])
    # a rerun keeps the ids (the key stays in private/); another output folder gets other ids
    again = _run(inp, tmp_path / "out")
    assert sorted(again["item_id"]) == sorted(df["item_id"])
    other = _run(inp, tmp_path / "out2")
    assert not set(other["item_id"]) & set(df["item_id"])
    # opting in: readable ids and paths in the manifest
    readable = _run(inp, tmp_path / "out3", readable_ids=True)
    assert any(i.startswith(f"{NAME}_ct-") for i in readable["item_id"].dropna())
    assert f"{NAME}/{NAME}_ct.nii.gz" in set(readable["source"])


def test_discovery_keys_ids_only_when_given_a_key(tmp_path):
    _nifti(tmp_path / "a" / "ct.nii.gz", _body())
    (readable,), _ = discover_items(tmp_path)
    (keyed,), _ = discover_items(tmp_path, b"k" * 32)
    assert readable.item_id.startswith("ct-") and re.fullmatch(r"ct-[0-9a-f]{8}", readable.item_id)  # stem 'ct'
    assert keyed.item_id == "ct-" + hmac.new(b"k" * 32, b"a/ct.nii.gz", hashlib.sha256).hexdigest()[:16]


def test_secret_from_env_or_file_and_its_errors(tmp_path, monkeypatch):
    assert resolve_secret({}) is None
    assert resolve_secret({"ANATDIFF_PHI_SECRET": SECRET}) == SECRET
    assert resolve_secret({"ANATDIFF_PHI_SALT": SECRET}) == SECRET            # the earlier variable
    (tmp_path / "s").write_text(SECRET + "\n")
    assert resolve_secret({"ANATDIFF_PHI_SECRET_FILE": str(tmp_path / "s"), "ANATDIFF_PHI_SECRET": "x" * 20}) == SECRET
    with pytest.raises(UserError, match="ANATDIFF_PHI_SECRET: the secret has 5 characters, too few"):
        resolve_secret({"ANATDIFF_PHI_SECRET": "short"})
    with pytest.raises(UserError, match="ANATDIFF_PHI_SECRET_FILE: cannot read the secret file"):
        resolve_secret({"ANATDIFF_PHI_SECRET_FILE": str(tmp_path / "missing")})
    assert patient_key("MRN-1", SECRET) == hmac.new(SECRET.encode(), b"MRN-1", hashlib.sha256).hexdigest()
    assert patient_key("MRN-1", None) == hmac.new(PUBLIC_KEY.encode(), b"MRN-1", hashlib.sha256).hexdigest()


def test_patient_ids_without_a_secret_are_refused_in_one_line(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    write_ct_series(inp / "a", _body() + 1024, intercept=-1024, tags={"PatientID": "MRN-123456"})
    with pytest.raises(UserError) as err:
        _run(inp, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "MRN" not in message
    assert message.startswith("the DICOM files carry patient IDs (PatientID, not declared de-identified) and no "
                              "secret is set: patient keys would be guessable; set ANATDIFF_PHI_SECRET")
    assert not (tmp_path / "out" / "manifest.parquet").exists() and not (tmp_path / "out" / "volumes").exists()
    # patients.csv names patients: refused before any work too
    _nifti(tmp_path / "nii" / "ct.nii.gz", _body())
    (tmp_path / "nii" / "patients.csv").write_text("source,patient\nct.nii.gz,MRN-99\n")
    with pytest.raises(UserError, match="patients.csv names 1 patients and no secret is set"):
        _run(tmp_path / "nii", tmp_path / "out-nii")
    # with the secret: keyed
    monkeypatch.setenv("ANATDIFF_PHI_SECRET", SECRET)
    df = _run(inp, tmp_path / "out")
    assert df.loc[0, "patient_key"] == hmac.new(SECRET.encode(), b"MRN-123456", hashlib.sha256).hexdigest()


def test_an_identified_series_found_after_the_first_folder_stops_the_job_at_the_end(tmp_path, monkeypatch):
    """The first DICOM folder is de-identified (the pre-check passes), a later one is not: the workers find it,
    the job stops before writing the manifest, and that folder is not marked done."""
    inp = tmp_path / "in"
    write_ct_series(inp / "a", _body() + 1024, intercept=-1024,
                    tags={"PatientID": "PSEUDO-1", "PatientIdentityRemoved": "YES"})
    write_ct_series(inp / "b", _body() + 1024, intercept=-1024, tags={"PatientID": "MRN-654321"})
    with pytest.raises(UserError, match="^1 DICOM series carry patient IDs"):
        _run(inp, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    assert len(list((tmp_path / "out" / "private" / "done").glob("*.json"))) == 1
    monkeypatch.setenv("ANATDIFF_PHI_SECRET", SECRET)
    df = _run(inp, tmp_path / "out")
    assert sorted(df["patient_key"]) == sorted(hmac.new(SECRET.encode(), p, hashlib.sha256).hexdigest()
                                               for p in (b"PSEUDO-1", b"MRN-654321"))


def test_public_data_needs_no_secret(tmp_path):
    """De-identified DICOM (the phantoms' way) and the committed real CT (NRRD, no patient tags)."""
    inp = tmp_path / "in"
    write_ct_series(inp / "phantom", _body() + 1024, intercept=-1024,
                    tags={"PatientID": "PH-0-1", "PatientIdentityRemoved": "YES"})
    df = _run(inp, tmp_path / "out")
    assert df.loc[0, "status"] == "accepted"
    assert df.loc[0, "patient_key"] == hmac.new(PUBLIC_KEY.encode(), b"PH-0-1", hashlib.sha256).hexdigest()
    cfg = PreprocessConfig(input=str(REAL_CHEST), output=str(tmp_path / "real"), log_to_mlflow=False)
    chest = run_preprocess(cfg, progress=False, map_units=map_units_in_process)
    n_chest = len(list(REAL_CHEST.glob("*.nrrd")))                    # two chest CTs (tests/data/real-ct/README.md)
    assert list(chest["status"]) == ["accepted"] * n_chest and chest["patient_key"].isna().all()
    assert json.loads((tmp_path / "real" / "report.json").read_text())["counts"]["accepted"] == n_chest
    assert read_manifest(tmp_path / "real")["source"].isna().all()
