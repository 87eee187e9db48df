"""preprocess_item: QC reasons as rows, outputs on disk, label placement, real CT; the manifest; Ray Data."""

import hashlib
import hmac
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.config import PreprocessConfig, UserError
from pipeline.data.patches import volume_digest
from pipeline.ingest.manifest import COLUMNS, ROW_FIELDS, read_manifest, skipped_row, summarize, write_manifest
from pipeline.ingest.phi import patient_key
from pipeline.ingest.preprocess import preprocess_item
from pipeline.io.layouts import discover_items
from pipeline.labels import ORGAN_TO_LABEL
from ingest_helpers import manifest_with_sources

REAL = Path(__file__).parent / "data" / "real-ct"


def _cfg(tmp_path, spacing=(2.0, 2.0, 2.0), **kw) -> PreprocessConfig:
    return PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                            target_spacing_zyx_mm=spacing, **kw)


def _phantom_zyx(shape=(12, 16, 20)) -> np.ndarray:
    """int16 HU: air, a body box (40 HU) with an 'organ' (300 HU) at low x (the patient's right)."""
    vol = np.full(shape, -1000, np.int16)
    vol[2:10, 3:13, 3:17] = 40
    vol[4:8, 5:9, 4:8] = 300
    return vol


def _write(path: Path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(np.asarray(direction, float).ravel().tolist())
    sitk.WriteImage(img, str(path))
    return path


def _write_dicom(folder: Path, array_zyx, modality="CT", patient_id="PAT-7") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.88"
    for k in range(array_zyx.shape[0]):
        sl = sitk.GetImageFromArray(array_zyx[k:k + 1].astype(np.int16))[:, :, 0]
        for tag, value in {"0008|0060": modality, "0020|000e": uid, "0008|0018": f"{uid}.{k + 1}",
                           "0010|0020": patient_id, "0008|0070": "ACME", "0008|1090": "Scan 64",
                           "0018|1210": "B30f", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0032": f"0\\0\\{2.0 * k}", "0020|0013": str(k + 1)}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)


def _run_one(tmp_path, **cfg_kw) -> dict:
    items, _ = discover_items(tmp_path / "in")
    assert len(items) == 1
    row = preprocess_item(items[0].to_dict(), _cfg(tmp_path, **cfg_kw), tmp_path / "out")
    json.dumps(row)  # JSON-able
    assert set(row) == set(ROW_FIELDS)
    return row


def _mhd_with(tmp_path, key: str, value: str) -> None:
    _write(tmp_path / "in" / "ct.mhd", _phantom_zyx())
    header = (tmp_path / "in" / "ct.mhd").read_text()
    (tmp_path / "in" / "ct.mhd").write_text(re.sub(rf"{key} = .*", f"{key} = {value}", header))


QC_CASES = {
    "unreadable": (lambda t: (t / "in").mkdir() or (t / "in" / "ct.nii.gz").write_bytes(b"\x1f\x8bgarbage"),
                   "unreadable: "),
    "2-D": (lambda t: _write(t / "in" / "ct.nrrd", np.zeros((16, 16), np.int16)), "2-D image: "),
    "not CT": (lambda t: _write_dicom(t / "in" / "s", _phantom_zyx(), modality="MR"), "not CT: modality MR"),
    "few slices": (lambda t: _write(t / "in" / "ct.nrrd", _phantom_zyx((3, 16, 20))), "too few slices: 3 < 8"),
    "NaN in NIfTI": (lambda t: _write(t / "in" / "ct.nii.gz", np.where(_phantom_zyx() > 100, np.nan, 0.0)
                                      .astype(np.float32)), "non-finite voxels: 64 NaN/Inf"),
    "Inf in NRRD": (lambda t: _write(t / "in" / "ct.nrrd", np.where(_phantom_zyx() > 100, np.inf, 0.0)),
                    "non-finite voxels: 64 NaN/Inf"),
    "zero spacing": (lambda t: _mhd_with(t, "ElementSpacing", "1 0 1"), "bad spacing: (x, y, z) (1.0, 0.0, 1.0)"),
    "negative spacing": (lambda t: _mhd_with(t, "ElementSpacing", "1 -2 1"), "bad spacing: "),
    # 10^12 voxels claimed by the header, 3 kB of pixels on disk: rejected before the pixels are read
    "huge header": (lambda t: _mhd_with(t, "DimSize", "10000 10000 10000"),
                    "too large: 1000000000000 voxels > max_voxels 1200000000"),
    "no body": (lambda t: _write(t / "in" / "ct.nrrd", np.full((8, 8, 8), -1000, np.int16)), "no body: "),
}


@pytest.mark.parametrize("case", list(QC_CASES))
def test_each_qc_rule_gives_a_rejected_row(tmp_path, case):
    make, reason = QC_CASES[case]
    make(tmp_path)
    row = _run_one(tmp_path)
    assert row["status"] == "rejected" and row["reason"].startswith(reason), row["reason"]
    assert "\n" not in row["reason"] and row["image_path"] is None
    assert not (tmp_path / "out" / "volumes").exists() or not any((tmp_path / "out" / "volumes").iterdir())


def test_max_voxels_from_config(tmp_path):
    _write(tmp_path / "in" / "ct.nrrd", _phantom_zyx())
    row = _run_one(tmp_path, max_voxels=1000)
    assert row["reason"] == "too large: 3840 voxels > max_voxels 1000"


def test_label_with_values_outside_btcv_is_rejected(tmp_path):
    _write(tmp_path / "in" / "img" / "img0001.nii.gz", _phantom_zyx())
    _write(tmp_path / "in" / "label" / "label0001.nii.gz", np.full((12, 16, 20), 20, np.uint8))
    row = _run_one(tmp_path)
    assert row["status"] == "rejected" and row["reason"].startswith("bad label: values [20]")


def test_accepted_item_outputs_in_canonical_physical_space(tmp_path):
    """Image stored with y and z flipped, its label with x flipped: the label still covers the organ."""
    vol = _phantom_zyx()
    Z, Y, X = vol.shape
    _write(tmp_path / "in" / "img" / "img0001.nii.gz", vol[::-1, ::-1, :].copy(), (1.0, 1.0, 1.0),
           (0.0, Y - 1.0, Z - 1.0), np.diag([1.0, -1.0, -1.0]))
    label = np.where(vol == 300, ORGAN_TO_LABEL["liver"], 0).astype(np.uint8)
    _write(tmp_path / "in" / "label" / "label0001.nii.gz", label[:, :, ::-1].copy(), (1.0, 1.0, 1.0),
           (X - 1.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]))
    row = _run_one(tmp_path, spacing=(1.0, 1.0, 1.0))
    assert row["status"] == "accepted", row["reason"]
    out = tmp_path / "out"
    image, mask, lab = (np.load(out / row[c]) for c in ("image_path", "mask_path", "label_path"))
    assert image.dtype == np.int16 and mask.dtype == np.uint8 and lab.dtype == np.uint8
    assert image.shape == mask.shape == lab.shape == tuple(row["shape"])
    # body box (2:10, 3:13, 3:17) + 10 voxels margin clipped to the volume: the whole volume
    assert row["shape"] == [Z, Y, X] and row["origin_xyz_mm"] == pytest.approx([0.0, 0.0, 0.0])
    np.testing.assert_array_equal(image, vol)
    np.testing.assert_array_equal(lab, label)
    assert row["spacing_mm"] == [1.0, 1.0, 1.0] and row["source_shape"] == [Z, Y, X] and row["has_label"]
    assert mask[vol == 40].all() and not mask[0].any()
    # the digest the jobs order volumes by: the one a reader computes from the written volume (older manifests)
    assert row["volume_digest"] == volume_digest(np.load(out / row["image_path"], mmap_mode="r"), (1.0, 1.0, 1.0))
    other = image.copy()
    other[Z // 2, 0, 0] += 1
    digests = {row["volume_digest"], volume_digest(other, (1.0, 1.0, 1.0)), volume_digest(image, (1.0, 1.0, 2.0))}
    assert len(digests) == 3


def test_crop_origin_and_clip_after_resampling(tmp_path):
    vol = np.full((40, 40, 40), -3000, np.int16)
    vol[10:30, 12:28, 14:26] = 5000  # clipped to 3071
    _write(tmp_path / "in" / "ct.nrrd", vol, (1.0, 1.0, 1.0), (-20.0, -30.0, 100.0))
    row = _run_one(tmp_path, spacing=(2.0, 2.0, 2.0))
    image = np.load(tmp_path / "out" / row["image_path"])
    assert image.min() == -1024 and image.max() == 3071
    # 2 mm grid centres at -19.5 + 2 i (x) and 100.5 + 2 k (z); the body starts at x = -6 mm (i = 7) and
    # z = 110 mm (k = 5); the 10 mm margin is 5 voxels, clipped at 0 along z
    assert row["shape"][0] == 20 and row["origin_xyz_mm"][2] == pytest.approx(100.5)
    assert row["origin_xyz_mm"][0] == pytest.approx(-19.5 + 2 * (7 - 5))


def test_dicom_ct_gets_scanner_and_keyed_patient_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("ANATDIFF_PHI_SECRET", "s3cret-s3cret-s3cret")
    _write_dicom(tmp_path / "in" / "series", _phantom_zyx())
    row = _run_one(tmp_path)
    assert row["status"] == "accepted", row["reason"]
    assert row["modality"] == "CT" and row["scanner_key"] == "ACME|Scan 64|B30f"
    assert row["patient_key"] == hmac.new(b"s3cret-s3cret-s3cret", b"PAT-7", hashlib.sha256).hexdigest()
    assert "PAT-7" not in json.dumps(row)


def test_real_btcv_ct_labels_are_aligned(tmp_path):
    items, skipped = discover_items(REAL)
    by_name = {Path(i.source).name: i for i in items}
    cfg = _cfg(tmp_path, spacing=(3.0, 3.0, 3.0))
    row = preprocess_item(by_name["img0001.nii.gz"], cfg, tmp_path / "out")
    assert row["status"] == "accepted" and row["has_label"], row["reason"]
    out = tmp_path / "out"
    image, mask, lab = (np.load(out / row[c]) for c in ("image_path", "mask_path", "label_path"))
    liver, spleen = lab == ORGAN_TO_LABEL["liver"], lab == ORGAN_TO_LABEL["spleen"]
    assert 40 <= image[liver].mean() <= 200             # measured 44.5 HU
    assert np.nonzero(liver)[2].mean() + 30 < np.nonzero(spleen)[2].mean()  # right = low x (LPS)
    assert mask[lab > 0].all()
    assert set(np.unique(lab)) == set(range(14)) - {ORGAN_TO_LABEL["esophagus"]}
    assert 0.5 < mask.mean() < 0.8 and -150 < image[mask.astype(bool)].mean() < 50


def test_real_chest_nrrd_is_accepted_with_filled_lungs(tmp_path):
    item = next(i for i in discover_items(REAL)[0] if i.kind == "nrrd")
    row = preprocess_item(item, _cfg(tmp_path, spacing=(3.0, 3.0, 3.0)), tmp_path / "out")
    assert row["status"] == "accepted", row["reason"]
    assert row["spacing_mm"] == pytest.approx([5.0, 2.28125, 2.28125]) and row["source_shape"] == [48, 128, 128]
    image = np.load(tmp_path / "out" / row["image_path"])
    mask = np.load(tmp_path / "out" / row["mask_path"]).astype(bool)
    width_mm = 3.0 * np.ptp(np.nonzero(mask.any(axis=(0, 1)))[0])
    assert 250 < width_mm < 350                          # measured 288 mm
    lung = image < -700
    assert mask[lung].sum() / mask.sum() > 0.15          # lungs are inside the body (holes filled)


def test_manifest_roundtrip_and_summary(tmp_path):
    rows = [{"item_id": "a-1", "source": "a.nii", "files": ["a.nii"], "status": "accepted",
             "shape": [4, 5, 6], "spacing_mm": [1.0, 1.0, 1.0], "image_path": "volumes/a-1.npy"},
            {"item_id": "b-2", "source": "b.nii", "files": ["b.nii"], "status": "rejected",
             "reason": "too few slices: 3 < 8"},
            skipped_row("notes.txt", "not an image file (.txt)")]
    write_manifest(rows, tmp_path)
    df = read_manifest(tmp_path)
    assert list(df.columns) == list(COLUMNS) and list(df.status) == ["accepted", "rejected", "skipped"]
    assert list(df.loc[0, "shape"]) == [4, 5, 6] and pd.isna(df.loc[1, "image_path"])
    assert summarize(df) == "1 accepted, 1 rejected (too few slices: 1), 1 skipped (not an image file (.txt): 1)"
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="status"):
        write_manifest([{"item_id": "x", "status": "done"}], tmp_path)
    with pytest.raises(UserError, match="anatdiff preprocess"):
        read_manifest(tmp_path / "missing")
    assert patient_key(None, "s" * 16) is None and patient_key("P1", "a" * 16) != patient_key("P1", "b" * 16)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_data_preprocess_accounts_for_every_file(tmp_path):
    import ray

    from pipeline.distributed.ingest import run_preprocess

    for i in range(3):
        _write(tmp_path / "in" / f"ct{i}.nii.gz", _phantom_zyx())
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"corrupt")
    (tmp_path / "in" / "notes.txt").write_text("hello")
    try:
        df = run_preprocess(_cfg(tmp_path, num_cpus=2, log_to_mlflow=False), progress=False)
    finally:
        ray.shutdown()
    assert summarize(df) == "3 accepted, 1 rejected (unreadable: 1), 1 skipped (not an image file (.txt): 1)"
    assert df.equals(read_manifest(tmp_path / "out"))
    assert df["source"].isna().all() and not any(len(f) for f in df["files"])  # paths only in private/
    files = sorted(f for fs in manifest_with_sources(tmp_path / "out")["files"] for f in fs)
    assert files == sorted(p.name for p in (tmp_path / "in").iterdir())
    for rel in df.loc[df.status == "accepted", "image_path"]:
        assert np.load(tmp_path / "out" / rel).dtype == np.int16
    with pytest.raises(UserError, match="inside the input folder"):
        run_preprocess(PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "in" / "o")))
