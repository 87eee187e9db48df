"""Ingestion without Ray: every QC reason from a generated bad input, DICOM series splitting (empty UIDs),
patients.csv, the report's accounting and histograms, resume keys and markers, filesystem helpers."""

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.config import PreprocessConfig, UserError
from pipeline.ingest.manifest import ROW_FIELDS, empty_row
from pipeline.ingest.phi import key_for_source, parse_patients_csv, patient_keys
from pipeline.ingest.report import HU_EDGES, corpus_report, hist_quantile_hu, hu_histogram, scanner_table
from pipeline.ingest.resume import content_key, load_done, remove_partial_files, write_done
from pipeline.ingest.units import run_unit
from pipeline.io.filesystems import FileEntry, _public, list_files
from pipeline.io.layouts import discover_items

AXIAL = "1\\0\\0\\0\\1\\0"


def body_zyx(n_z=10, size=24) -> np.ndarray:
    """int16 HU: air around a 40 HU box with a 300 HU core (3 x 3 voxels)."""
    vol = np.full((n_z, size, size), -1000, np.int16)
    vol[:, 3:size - 3, 3:size - 3] = 40
    vol[:, 9:12, 9:12] = 300
    return vol


def write_slices(folder: Path, array_zyx, z_mm=None, uid="1.2.826.0.1.3680043.2.1125.5", orientation=AXIAL,
                 image_type="ORIGINAL\\PRIMARY\\AXIAL", modality="CT", prefix="s", tags=None) -> list[Path]:
    """One DICOM file per z slice at positions ``z_mm`` (default 2 mm apart), with optional extra ``tags``."""
    folder.mkdir(parents=True, exist_ok=True)
    z_mm = [2.0 * k for k in range(len(array_zyx))] if z_mm is None else z_mm
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k, z in enumerate(z_mm):
        sl = sitk.GetImageFromArray(np.asarray(array_zyx[k:k + 1], np.int16))[:, :, 0]
        sl.SetSpacing((1.0, 1.0))
        meta = {"0008|0060": modality, "0020|000e": uid, "0008|0008": image_type, "0020|0037": orientation,
                "0020|0032": f"0\\0\\{z}", "0020|0013": str(k + 1), "0008|0070": "ACME", "0008|1090": "Scan 64",
                "0018|1210": "B30f", "0018|0050": "2.0", "0018|0060": "120", **(tags or {})}
        for tag, value in meta.items():
            sl.SetMetaData(tag, value)
        paths.append(folder / f"{prefix}{k:03d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(sl)
    return paths


def _write(path: Path, array, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _rows(tmp_path, **cfg_kw) -> list[dict]:
    """All rows of the corpus in tmp_path/in, through discovery and run_unit (what a Ray task runs)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    cfg = PreprocessConfig(input=str(inp), output=str(out), target_spacing_zyx_mm=(2.0, 2.0, 2.0),
                           log_to_mlflow=False, **cfg_kw)
    items, skipped = discover_items(inp)
    listing = {e.rel: e for e in list_files(inp)}
    rows = [r for i in items for r in run_unit(i.to_dict(), cfg, out, content_key(i.files, listing, cfg))]
    assert all(set(r) == set(ROW_FIELDS) and "\n" not in (r["reason"] or "") for r in rows)
    json.dumps(rows)
    files = sorted([f for r in rows for f in r["files"]] + [s for s, _ in skipped])
    assert files == sorted(listing)  # every input file in exactly one row
    return rows


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


QC_CASES = {
    "truncated NIfTI": (lambda t: _truncate(_write(t / "in" / "ct.nii", body_zyx())),
                        "truncated: 5584 of 11520 pixel bytes present"),
    "truncated NIfTI.gz": (lambda t: _truncate(_write(t / "in" / "ct.nii.gz", body_zyx()), 0.8), "truncated: "),
    "half a NIfTI.gz": (lambda t: _truncate(_write(t / "in" / "ct.nii.gz", body_zyx())), "unreadable: "),
    "truncated MHA": (lambda t: _truncate(_write(t / "in" / "ct.mha", body_zyx())), "unreadable: "),
    # one cause, one place: the series is rejected naming its damaged slice (not a 'missing slices' gap plus
    # a skipped file)
    "truncated DICOM slice": (lambda t: _truncate(write_slices(t / "in" / "s", body_zyx())[4], 0.9),
                              "damaged slice: file 10 of 10 of this series is cut short ("),
    "MR intensities in NRRD": (lambda t: _write(t / "in" / "mr.nrrd", (body_zyx() + 1000).astype(np.int16)),
                               "not CT: darkest voxel 0 > -500 HU"),
    "MR DICOM": (lambda t: write_slices(t / "in" / "s", body_zyx(), modality="MR"), "not CT: modality MR"),
    "localizer ImageType": (lambda t: write_slices(t / "in" / "s", body_zyx(),
                                                   image_type="ORIGINAL\\PRIMARY\\LOCALIZER"),
                            "localizer: ImageType ORIGINAL\\PRIMARY\\LOCALIZER"),
    "single-slice scout": (lambda t: write_slices(t / "in" / "s", body_zyx(1)), "localizer: 1-slice DICOM series"),
    "missing slices": (lambda t: write_slices(t / "in" / "s", body_zyx(), z_mm=[0, 2, 4, 6, 12, 14, 16, 18, 20, 22]),
                       "missing slices: gap of 6.00 mm after slice 3 (slice step 2.00 mm, about 2 missing)"),
    "non-uniform spacing": (lambda t: write_slices(t / "in" / "s", body_zyx(),
                                                   z_mm=[0, 2, 4, 6, 8, 10.5, 13, 15.5, 18, 20.5]),
                            "non-uniform slice spacing: steps 2.00..2.50 mm"),
    "too few slices": (lambda t: write_slices(t / "in" / "s", body_zyx(5)), "too few slices: 5 < 8"),
    "implausible spacing": (lambda t: _write(t / "in" / "ct.nrrd", body_zyx(), (1.0, 1.0, 25.0)),
                            "implausible spacing: (x, y, z) (1.0, 1.0, 25.0) mm, allowed 0.1..20.0 mm"),
    "tiny spacing": (lambda t: _write(t / "in" / "ct.mha", body_zyx(), (0.05, 1.0, 1.0)), "implausible spacing: "),
    "NaN in NIfTI": (lambda t: _write(t / "in" / "ct.nii.gz", np.where(body_zyx() > 100, np.nan, -1000.0)
                                      .astype(np.float32)), "non-finite voxels: 90 NaN/Inf"),
}


@pytest.mark.parametrize("case", list(QC_CASES))
def test_each_new_qc_rule_rejects_with_its_reason(tmp_path, case):
    make, reason = QC_CASES[case]
    make(tmp_path)
    rows = [r for r in _rows(tmp_path) if r["status"] != "skipped"]
    assert len(rows) == 1 and rows[0]["status"] == "rejected", rows
    assert rows[0]["reason"].startswith(reason), rows[0]["reason"]
    assert not (tmp_path / "out" / "volumes").exists()


def test_anonymized_series_with_empty_uids_split_by_geometry(tmp_path):
    """Two series without SeriesInstanceUID in one folder (axial 16x16 and 12x12): two accepted items. GDCM
    alone would merge them into one series ''."""
    write_slices(tmp_path / "in" / "exp" / "a", body_zyx(), uid="", prefix="a")
    write_slices(tmp_path / "in" / "exp" / "a", body_zyx(9, 20), uid="", prefix="b")
    (tmp_path / "in" / "exp" / "a" / "DICOMDIR").write_bytes(b"\0" * 200)
    assert sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(tmp_path / "in" / "exp" / "a")) == ("",)
    rows = {r["source"]: r for r in _rows(tmp_path)}
    items = [r for r in rows.values() if r["status"] != "skipped"]
    assert sorted((r["status"], r["source_shape"]) for r in items) == [
        ("accepted", [9, 20, 20]), ("accepted", [10, 24, 24])]
    assert all(re.fullmatch(r"exp/a#nouid\.g[0-9a-f]{8}", r["source"]) for r in items)
    assert rows["exp/a/DICOMDIR"]["status"] == "skipped"
    assert items[0]["scanner_key"] == "ACME|Scan 64|B30f" and items[0]["kvp"] == 120.0
    assert items[0]["slice_thickness_mm"] == 2.0 and items[0]["contrast"] is False


def test_two_anonymized_series_with_the_same_geometry_are_not_merged_silently(tmp_path):
    write_slices(tmp_path / "in" / "s", body_zyx(), uid="", prefix="a")
    write_slices(tmp_path / "in" / "s", body_zyx(), uid="", prefix="b")
    (row,) = _rows(tmp_path)
    assert row["status"] == "rejected" and row["reason"].startswith("duplicate slices: 10 slices share")


def test_accepted_dicom_series_sorted_by_position_not_file_name(tmp_path):
    vol = body_zyx()
    vol[7] = 1000  # a bright slice at z = 14 mm, stored in the file written first
    order = [7, 0, 1, 2, 3, 4, 5, 6, 8, 9]
    write_slices(tmp_path / "in" / "s", vol[order], z_mm=[2.0 * k for k in order])
    (row,) = _rows(tmp_path)
    assert row["status"] == "accepted", row["reason"]
    image = np.load(tmp_path / "out" / row["image_path"])
    assert row["origin_xyz_mm"][2] == pytest.approx(0.0) and row["spacing_mm"] == [2.0, 1.0, 1.0]
    assert np.argmax(image[:, 5, 5]) == 7  # 2 mm target: slice k at 2k mm
    hist = np.asarray(row["hu_hist_body"])
    assert hist.shape == (64,) and hist.sum() == np.load(tmp_path / "out" / row["mask_path"]).sum()


def test_patients_csv_keys_nifti_items_and_is_accounted(tmp_path, monkeypatch):
    monkeypatch.setenv("ANATDIFF_PHI_SECRET", "pepper-pepper-pepper")
    for name in ("crop1.nii.gz", "crop2.nii.gz", "other.nii.gz"):
        _write(tmp_path / "in" / name, body_zyx())
    (tmp_path / "in" / "patients.csv").write_text("source,patient\ncrop1.nii.gz,JD-77\ncrop2.nii.gz,JD-77\n")
    keys = patient_keys(parse_patients_csv((tmp_path / "in" / "patients.csv").read_text()), "pepper-pepper-pepper")
    rows = []
    items, skipped = discover_items(tmp_path / "in")
    assert dict(skipped) == {"patients.csv": "patient mapping (patients.csv)"}
    cfg = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), log_to_mlflow=False)
    for i in items:
        rows += run_unit(i, cfg, tmp_path / "out", "k", keys)
    by_source = {r["source"]: r["patient_key"] for r in rows}
    expected = hmac.new(b"pepper-pepper-pepper", b"JD-77", hashlib.sha256).hexdigest()
    assert by_source["crop1.nii.gz"] == by_source["crop2.nii.gz"] == expected
    assert by_source["other.nii.gz"] is None
    assert key_for_source("dcm#1.2.3", {"dcm": "k1"}) == "k1"
    with pytest.raises(UserError, match="line 3: a source is listed twice"):
        parse_patients_csv("source,patient\na,P1\na,P2\n")
    with pytest.raises(UserError, match="header line 'source,patient'"):
        parse_patients_csv("file,id\na,P1\n")


def test_hu_histogram_and_quantiles_golden():
    values = np.array([-2000, -1024, -1000, 0, 0, 40, 1999, 5000])
    hist = hu_histogram(values)
    assert hist.sum() == 8 and HU_EDGES[1] - HU_EDGES[0] == pytest.approx(47.25)
    assert hist[0] == 3 and hist[-1] == 2 and hist[np.searchsorted(HU_EDGES, 0, side="right") - 1] == 2
    flat = np.ones(64)
    assert hist_quantile_hu(flat, 0.5) == pytest.approx(488.0)  # middle of [-1024, 2000]
    assert np.isnan(hist_quantile_hu(np.zeros(64), 0.5))


def test_report_accounting_finds_missing_and_duplicated_files():
    m = pd.DataFrame([empty_row(item_id="a", source="a", files=["a.nii", "x"], status="accepted",
                                scanner_key="S1", spacing_mm=[2.0, 1.0, 1.0], hu_hist_body=[1] * 64),
                      empty_row(item_id="b", source="b", files=["x"], status="rejected", reason="not CT: MR",
                                scanner_key="S1")])
    rep = corpus_report(m, ["a.nii", "x", "y"])
    assert rep["counts"] == {"accepted": 1, "rejected": 1, "skipped": 0}
    assert rep["rejected_by_reason"] == {"not CT": 1}
    assert rep["files"]["missing"] == ["y"] and rep["files"]["duplicated"] == ["x"]
    table = scanner_table(m)
    assert table.loc[0, ["items", "accepted", "rejected"]].tolist() == [2, 1, 1]
    assert table.loc[0, "spacing_z_mm"] == 2.0 and table.loc[0, "body_hu_p50"] == pytest.approx(488.0)


def test_content_key_and_done_markers(tmp_path):
    cfg = PreprocessConfig(input="in", output="out")
    listing = {"a": FileEntry("a", 10, 5), "b": FileEntry("b", 3, 7)}
    key = content_key(["a", "b"], listing, cfg)
    assert key == content_key(["b", "a"], listing, cfg)
    assert key != content_key(["a", "b"], {**listing, "b": FileEntry("b", 4, 7)}, cfg)
    assert key != content_key(["a", "b"], {**listing, "b": FileEntry("b", 3, 8)}, cfg)
    assert key != content_key(["a", "b"], listing, cfg.model_copy(update={"target_spacing_zyx_mm": (1, 1, 1)}))
    rows = [{"image_path": "volumes/x.npy", "mask_path": "masks/x.npy", "label_path": None}]
    write_done(tmp_path, "x", key, rows)
    assert load_done(tmp_path, "x", key) is None  # arrays missing
    for rel in ("volumes/x.npy", "masks/x.npy"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        np.save(tmp_path / rel, np.zeros(2))
    assert load_done(tmp_path, "x", key) == rows and load_done(tmp_path, "x", "other") is None
    (tmp_path / "volumes" / ".y.npy.tmp-123").write_bytes(b"half")
    assert [p.name for p in remove_partial_files(tmp_path)] == [".y.npy.tmp-123"]
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_list_files_and_credentials_kept_out_of_messages(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.nii").write_bytes(b"12345")
    (tmp_path / ".hidden").write_text("h")
    entries = list_files(tmp_path)
    assert [(e.rel, e.size) for e in entries] == [(".hidden", 1), ("a/b/x.nii", 5)]
    assert entries[1].mtime_ns == os.stat(tmp_path / "a" / "b" / "x.nii").st_mtime_ns
    assert _public("s3://KEY:SECRET@bucket/pre?endpoint_override=h") == "s3://bucket/pre"
    with pytest.raises(UserError, match="does not exist"):
        list_files(tmp_path / "nope")
