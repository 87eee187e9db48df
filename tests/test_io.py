"""Dataset layouts (BTCV, MSD, nnU-Net v2, plain folders, DICOM series) and the readers."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.config import UserError
from pipeline.ingest.preprocess import split_dicom_folder
from pipeline.io.layouts import discover_items, make_item_id
from pipeline.io.dicom import read_slice_header
from pipeline.io.readers import nifti_nonfinite_count, read_header, read_image

SERIES_A = "1.2.826.0.1.3680043.2.1125.77.1"
SERIES_B = "1.2.826.0.1.3680043.2.1125.77.2"


def write_image(path: Path, shape_zyx=(8, 8, 8), value=0, dtype=np.int16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full(shape_zyx, value, dtype)), str(path))
    return path


def write_dicom_series(folder: Path, array_zyx: np.ndarray, spacing_xyz=(0.7, 0.7, 2.5), series_uid=SERIES_A,
                       modality="CT", patient_id="PAT-1", prefix="s") -> list[Path]:
    """One int16 slice file per z, with the tags a scanner writes (position, orientation, modality, IDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(array_zyx.shape[0]):
        sl = sitk.GetImageFromArray(array_zyx[k:k + 1].astype(np.int16))[:, :, 0]
        sl.SetSpacing(spacing_xyz[:2])
        tags = {"0008|0060": modality, "0020|000e": series_uid, "0020|000d": series_uid + ".9",
                "0008|0018": f"{series_uid}.{k + 1}", "0010|0020": patient_id, "0008|0070": "ACME",
                "0008|1090": "Scan 64", "0018|1210": "B30f", "0018|0050": str(spacing_xyz[2]),
                "0020|0013": str(k + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": f"-10\\20\\{100 + k * spacing_xyz[2]}"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        paths.append(folder / f"{prefix}{k:03d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(sl)
    return paths


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _accounted_once(root: Path, items, skipped) -> None:
    listed = [f for i in items for f in i.files] + [s for s, _ in skipped]
    assert sorted(listed) == _all_files(root)


def test_btcv_layout_pairs_by_number(tmp_path):
    for n in ("0001", "0002"):
        write_image(tmp_path / "img" / f"img{n}.nii.gz")
    write_image(tmp_path / "label" / "label0001.nii.gz", dtype=np.uint8)
    write_image(tmp_path / "label" / "label0007.nii.gz", dtype=np.uint8)
    (tmp_path / "notes.txt").write_text("x")
    items, skipped = discover_items(tmp_path)
    by_source = {i.source: i for i in items}
    assert set(by_source) == {"img/img0001.nii.gz", "img/img0002.nii.gz"}
    assert by_source["img/img0001.nii.gz"].label == str(tmp_path / "label" / "label0001.nii.gz")
    assert by_source["img/img0002.nii.gz"].label is None
    assert dict(skipped)["label/label0007.nii.gz"].startswith("label without image")
    assert dict(skipped)["notes.txt"] == "not an image file (.txt)"
    _accounted_once(tmp_path, items, skipped)


def test_msd_layout_uses_the_training_list(tmp_path):
    write_image(tmp_path / "imagesTr" / "la_003.nii.gz")
    write_image(tmp_path / "labelsTr" / "la_003.nii.gz", dtype=np.uint8)
    write_image(tmp_path / "imagesTs" / "la_010.nii.gz")
    (tmp_path / "imagesTr" / "._la_003.nii.gz").write_bytes(b"\0\5junk")  # macOS tar residue
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"}], "test": []}))
    items, skipped = discover_items(tmp_path)
    assert [(i.source, i.label is not None, i.kind) for i in items] == [
        ("imagesTr/la_003.nii.gz", True, "nifti"), ("imagesTs/la_010.nii.gz", False, "nifti")]
    assert dict(skipped) == {"dataset.json": "layout metadata (dataset.json)",
                             "imagesTr/._la_003.nii.gz": "hidden file"}
    _accounted_once(tmp_path, items, skipped)


def test_nnunet_v2_naming_with_a_dicom_case(tmp_path):
    write_image(tmp_path / "imagesTr" / "case_a_0000.nii.gz")
    write_image(tmp_path / "imagesTr" / "case_a_0001.nii.gz")
    write_dicom_series(tmp_path / "imagesTr" / "case_b_0000", np.zeros((8, 6, 6)))
    for case in ("case_a", "case_b"):
        write_image(tmp_path / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                       "labels": {"background": 0, "liver": 1}}))
    items, skipped = discover_items(tmp_path)
    assert [(i.source, i.kind, Path(i.label).name) for i in items] == [
        ("imagesTr/case_a_0000.nii.gz", "nifti", "case_a.nii.gz"),
        ("imagesTr/case_b_0000", "dicom-folder", "case_b.nii.gz")]
    assert dict(skipped)["imagesTr/case_a_0001.nii.gz"].startswith("extra input channel")
    assert len(items[1].files) == 9  # 8 slices + the label
    _accounted_once(tmp_path, items, skipped)


def test_plain_folder_of_files_and_dicom_series(tmp_path):
    write_image(tmp_path / "a" / "ct.nii")
    write_image(tmp_path / "a" / "b" / "ct.nrrd")
    write_image(tmp_path / "ct.mha")
    write_image(tmp_path / "c" / "ct.mhd")                    # + ct.raw, part of the same item
    write_dicom_series(tmp_path / "dcm", np.zeros((8, 4, 4)), series_uid=SERIES_A, prefix="a")
    write_dicom_series(tmp_path / "dcm", np.zeros((9, 4, 4)), series_uid=SERIES_B, prefix="b")
    (tmp_path / "dcm" / "broken.dcm").write_bytes(b"not dicom at all")
    (tmp_path / "dcm" / "DICOMDIR_NOTES").write_text("hello")
    (tmp_path / "meta.json").write_text("{}")
    items, skipped = discover_items(tmp_path)
    kinds = {i.source: i.kind for i in items}
    assert kinds == {"a/ct.nii": "nifti", "a/b/ct.nrrd": "nrrd", "ct.mha": "mha", "c/ct.mhd": "mha",
                     "dcm": "dicom-folder"}
    by_source = {i.source: i for i in items}
    assert by_source["c/ct.mhd"].files == ("c/ct.mhd", "c/ct.raw")
    assert set(dict(skipped)) == {"meta.json"}
    _accounted_once(tmp_path, items, skipped)
    # the worker splits the DICOM folder into its two series; the two non-DICOM files are skipped
    series, not_dicom = split_dicom_folder(by_source["dcm"])
    series = [s for s, _ in series]
    assert [(s.source, s.series_uid, len(s.files), s.kind) for s in series] == [
        (f"dcm#{SERIES_B}", SERIES_B, 9, "dicom"), (f"dcm#{SERIES_A}", SERIES_A, 8, "dicom")]
    assert series[1].files == tuple(f"dcm/a{k:03d}.dcm" for k in range(8))
    assert dict(not_dicom).keys() == {"dcm/broken.dcm", "dcm/DICOMDIR_NOTES"}
    assert dict(not_dicom)["dcm/broken.dcm"] == "not an image file (no DICOM header; .dcm)"
    assert sorted([f for s in series for f in s.files] + list(dict(not_dicom))) == sorted(by_source["dcm"].files)
    assert len({i.item_id for i in items}) == len(items)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{8}", i.item_id) for i in items)


def test_item_id_is_deterministic_and_safe():
    assert make_item_id("img/img0001.nii.gz") == make_item_id("img/img0001.nii.gz")
    assert make_item_id("img/img0001.nii.gz").startswith("img0001-")
    assert make_item_id("x/ct.nii") != make_item_id("y/ct.nii")
    expected = "patient_1_copy-" + hashlib.sha1(b"a b/patient 1 (copy).nrrd").hexdigest()[:8]
    assert make_item_id("a b/patient 1 (copy).nrrd") == expected


def test_missing_or_empty_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        discover_items(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no CT image"):
        discover_items(tmp_path)


def test_dicom_series_reads_with_geometry_and_tags(tmp_path):
    arr = np.arange(8 * 5 * 6, dtype=np.int16).reshape(8, 5, 6) - 100
    write_dicom_series(tmp_path, arr, spacing_xyz=(0.7, 0.8, 2.5), modality="CT", patient_id="PAT-1")
    header = read_header(tmp_path)
    assert header["size_xyz"] == (6, 5, 8) and header["dimension"] == 3
    img = read_image(tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    assert img.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))
    assert img.GetOrigin() == pytest.approx((-10.0, 20.0, 100.0))
    tags = read_slice_header(sorted(tmp_path.glob("*.dcm"))[0]).tags
    assert tags["Modality"] == "CT" and tags["Manufacturer"] == "ACME" and tags["PatientID"] == "PAT-1"
    assert tags["ConvolutionKernel"] == "B30f" and tags["ContrastBolusAgent"] == ""


def test_nan_in_a_float_nifti_is_found_in_the_raw_bytes(tmp_path):
    arr = np.zeros((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    arr[4, 4, 4] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "x.nii.gz"))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "x.nii.gz")))).any()  # the pitfall
    assert nifti_nonfinite_count(tmp_path / "x.nii.gz") == 2
    assert nifti_nonfinite_count(write_image(tmp_path / "i.nii")) == 0


def test_prepare_output_refuses_remote_and_inside_the_input_relative_paths_included(tmp_path, monkeypatch):
    """Ingest and predict share this check; a relative input folder with the output inside it is refused too
    (predict compared a relative input with an absolute output before, and let it through)."""
    from pipeline.config import UserError
    from pipeline.io.filesystems import prepare_output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    for output in ("scans/out", "scans", str(tmp_path / "scans" / "a" / "b")):
        with pytest.raises(UserError, match="inside the input folder"):
            prepare_output(output, "scans")
    with pytest.raises(UserError, match="object-store URI"):
        prepare_output("s3://bucket/out", "scans")
    out = prepare_output("out", "scans")
    assert out == tmp_path / "out" and out.is_dir() and out.is_absolute()
    assert prepare_output("out2", "scan.nii.gz").is_dir()              # a single input file
    assert prepare_output("out3", "s3://bucket/scans").is_dir()       # a remote input
