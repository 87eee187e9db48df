"""`anatdiff predict` without Ray: label maps back on the original grid (oblique, flipped, anisotropic NIfTI
and an oblique DICOM series) with an oracle segmenter, organ volumes, rejections, resume, inputs, model URIs.

The oracle (tests/predict_helpers.py) answers only for volumes byte-identical to what `anatdiff preprocess`
writes, with the one-hot of the label preprocess put on that grid: it also pins predict's input to preprocess's.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.config import PredictConfig, UserError
from pipeline.distributed.predict import map_in_process, model_folder, run_predict
from pipeline.predict.outputs import organ_volumes_ml, voxel_volume_ml
from pipeline.predict.report import volumes_table
from pipeline.predict.scan import dice_per_organ
from pipeline.predict.segmenter import check_segmenter, checked_probs
from pipeline.labels import ORGANS, ORGAN_TO_LABEL
from predict_helpers import (OBLIQUE_FLIPPED, load_oracle, phantom_on_grid, rotation, write_btcv,
                             write_dicom_series, write_oracle)

GEOMETRY = ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")


def _predict(inp, out, model, **kw) -> dict:
    cfg = PredictConfig(model=str(model), input=str(inp), output=str(out), **kw)
    return run_predict(cfg, progress=False, segmenter_factory=load_oracle, map_units=map_in_process)


def _assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    for getter in GEOMETRY[1:]:
        np.testing.assert_allclose(getattr(a, getter)(), getattr(b, getter)(), atol=1e-4, err_msg=getter)


def _table(out: Path, name: str = "predictions.csv") -> pd.DataFrame:
    return pd.read_csv(out / name)


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory):
    """A BTCV folder with one phantom on a y-flipped, 20-degree oblique, 3 x 3.5 x 4.5 mm grid."""
    root = tmp_path_factory.mktemp("oblique")
    image, label = phantom_on_grid(1)
    write_btcv(root / "in", [(image, label)])
    return root


@pytest.mark.parametrize("spacing_mm, min_dice", [(2.0, 0.99), (3.0, 0.9)])
def test_oblique_flipped_phantom_comes_back_on_its_own_grid(oblique_case, tmp_path, spacing_mm, min_dice):
    """Dice is limited only by the model grid: at 2 mm (finer than the scan's 3-4.5 mm) the round trip through
    it is exact; at 3 mm the adrenals (about 70 voxels) lose ~5 % at their edges, organs of 500+ voxels < 2 %."""
    model = write_oracle(oblique_case / "in", tmp_path / "model", (spacing_mm,) * 3)
    report = _predict(oblique_case / "in", tmp_path / "out", model)
    assert report["counts"] == {"predicted": 1, "rejected": 0, "skipped": 0}
    assert report["files"]["missing"] == report["files"]["duplicated"] == []
    row = _table(tmp_path / "out").iloc[0]
    source = sitk.ReadImage(str(oblique_case / "in" / "img" / "img0001.nii.gz"))
    truth = sitk.ReadImage(str(oblique_case / "in" / "label" / "label0001.nii.gz"))
    np.testing.assert_allclose(np.asarray(source.GetDirection()).reshape(3, 3), OBLIQUE_FLIPPED, atol=1e-5)
    pred = sitk.ReadImage(str(tmp_path / "out" / row.label_path))
    assert pred.GetPixelID() == sitk.sitkUInt8 and row.label_path == f"{row.item_id}.nii.gz"
    _assert_same_grid(pred, source)
    dice = dice_per_organ(sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(pred))
    assert set(dice) == set(ORGANS)                                  # the phantom holds all 13 organs
    counts = np.bincount(sitk.GetArrayFromImage(truth).ravel(), minlength=14)
    big = {o: d for o, d in dice.items() if counts[ORGAN_TO_LABEL[o]] >= 500}
    assert min(dice.values()) >= min_dice and min(big.values()) >= 0.98, dice
    for organ, value in dice.items():                                # predict's own Dice column agrees
        assert row[f"dice_{organ}"] == pytest.approx(value, abs=1e-9)
    assert (tmp_path / "out" / row.overlay_path).stat().st_size > 10_000
    volumes = _table(tmp_path / "out", "organ_volumes.csv").set_index("item_id").loc[row.item_id]
    pred_counts = np.bincount(sitk.GetArrayFromImage(pred).ravel(), minlength=14)
    voxel_ml = 3.0 * 3.5 * 4.5 / 1000
    for organ in ORGANS:
        assert volumes[f"{organ}_ml"] == pytest.approx(pred_counts[ORGAN_TO_LABEL[organ]] * voxel_ml, abs=1e-3)


def test_dicom_series_folder_gives_a_nifti_with_the_series_geometry(tmp_path):
    direction = rotation((0.2, 1.0, 0.1), 15.0) @ np.diag([-1.0, -1.0, 1.0])  # x, y reversed, tilted
    image, label = phantom_on_grid(2, (3.0, 3.5, 4.5), direction)
    labelled = tmp_path / "labelled"
    write_dicom_series(labelled / "imagesTr" / "case", image)
    (labelled / "labelsTr").mkdir()
    sitk.WriteImage(label, str(labelled / "labelsTr" / "case.nii.gz"))
    (labelled / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    model = write_oracle(labelled, tmp_path / "model", (2.0, 2.0, 2.0))
    scans = tmp_path / "scans"                                       # an unlabelled folder of one series
    write_dicom_series(scans / "PATIENT_DOE_JANE" / "series1", image)
    report = _predict(scans, tmp_path / "out", model, dicom_seg=True)
    assert report["counts"] == {"predicted": 1, "rejected": 0, "skipped": 0}
    row = _table(tmp_path / "out").iloc[0]
    assert row.n_files == image.GetSize()[2]
    assert "DOE" not in row.item_id + row.label_path + row.overlay_path + row.seg_path
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(scans / "PATIENT_DOE_JANE" / "series1"))
    series = sitk.ImageSeriesReader()
    series.SetFileNames(files)
    series_image = series.Execute()
    pred = sitk.ReadImage(str(tmp_path / "out" / row.label_path))
    _assert_same_grid(pred, series_image)
    np.testing.assert_allclose(np.asarray(pred.GetDirection()).reshape(3, 3), direction, atol=1e-5)
    dice = dice_per_organ(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(pred))
    assert min(dice.values()) >= 0.95, dice
    _assert_seg_matches(tmp_path / "out" / row.seg_path, files, sitk.GetArrayFromImage(pred))


def _assert_seg_matches(path: Path, files, labels_zyx: np.ndarray) -> None:
    """The DICOM SEG holds, on each source slice, the same organs as the NIfTI label map's slice."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(path)
    assert seg.PatientID == "PRED-TEST-1"                            # filed with its patient, as a SEG must be
    to_label = np.zeros(len(ORGANS) + 1, np.uint8)
    for d in seg.SegmentSequence:
        to_label[d.SegmentNumber] = ORGAN_TO_LABEL[d.SegmentLabel]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=False)
    np.testing.assert_array_equal(to_label[pixels], labels_zyx)


def test_organ_volumes_are_voxels_times_voxel_volume_on_a_hand_built_label():
    label = np.zeros((10, 12, 14), np.uint8)
    label[1:3, 2:7, 3:5] = ORGAN_TO_LABEL["liver"]                   # 2 * 5 * 2 = 20 voxels
    label[5, 5, 5] = ORGAN_TO_LABEL["spleen"]                        # 1 voxel
    image = sitk.GetImageFromArray(label)
    image.SetSpacing((0.8, 0.75, 2.5))                               # x, y, z mm
    image.SetDirection(rotation((1.0, 0.0, 1.0), 30.0).ravel().tolist())
    voxel_ml = voxel_volume_ml(image)
    assert voxel_ml == pytest.approx(0.8 * 0.75 * 2.5 / 1000)        # a rotation keeps the voxel volume
    volumes = organ_volumes_ml(label, voxel_ml)
    assert volumes["liver_ml"] == pytest.approx(0.03) and volumes["spleen_ml"] == pytest.approx(0.0015)
    assert sum(v for k, v in volumes.items() if k not in ("liver_ml", "spleen_ml")) == 0.0
    table = volumes_table([{"item_id": "b", "status": "predicted", "volumes_ml": volumes},
                           {"item_id": "a", "status": "rejected", "volumes_ml": {}}])
    assert table.columns.tolist() == ["item_id", *(f"{o}_ml" for o in ORGANS)]
    assert table.item_id.tolist() == ["b"] and table.liver_ml[0] == pytest.approx(0.03)


def _bad_inputs(root: Path, good: Path) -> None:
    (root / "good.nii.gz").write_bytes(good.read_bytes())
    (root / "truncated.nii.gz").write_bytes((root / "good.nii.gz").read_bytes()[:4000])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.int16)), str(root / "flat.nii.gz"))
    mr = sitk.Cast(sitk.GetImageFromArray(np.full((12, 30, 30), 300, np.int16)), sitk.sitkInt16)
    sitk.WriteImage(mr, str(root / "mr.nii.gz"))
    (root / "notes.txt").write_text("exported by hand")


def test_bad_inputs_get_rejected_rows_and_every_file_is_accounted_for(oblique_case, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    _bad_inputs(inp, oblique_case / "in" / "img" / "img0001.nii.gz")
    model = write_oracle(oblique_case / "in", tmp_path / "model", (3.0, 3.0, 3.0))
    report = _predict(inp, tmp_path / "out", model, overlays=False)
    assert report["counts"] == {"predicted": 1, "rejected": 3, "skipped": 1}
    assert report["summary"] == "1 predicted, 3 rejected (2-D image: 1, not CT: 1, truncated: 1), 1 skipped"
    assert report["files"] == {"input": 5, "missing": [], "duplicated": []}
    table = _table(tmp_path / "out").set_index("source")
    assert table.loc["good.nii.gz", "status"] == "predicted" and pd.isna(table.loc["good.nii.gz", "overlay_path"])
    assert table.loc["truncated.nii.gz", "reason"].startswith("truncated:")
    assert table.loc["flat.nii.gz", "reason"].startswith("2-D image:")
    assert table.loc["mr.nii.gz", "reason"].startswith("not CT:")
    assert table.loc["notes.txt", "status"] == "skipped"
    written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert written == [f"{table.loc['good.nii.gz', 'item_id']}.nii.gz"]
    assert len(_table(tmp_path / "out", "organ_volumes.csv")) == 1


def test_a_broken_model_output_is_a_rejection_reason_not_a_crash(oblique_case, tmp_path):
    model = write_oracle(oblique_case / "in", tmp_path / "model", (3.0, 3.0, 3.0), mode="wrong-shape")
    report = _predict(oblique_case / "in" / "img" / "img0001.nii.gz", tmp_path / "out", model)
    assert report["counts"]["rejected"] == 1
    reason = _table(tmp_path / "out").reason[0]
    assert reason.startswith("error: ValueError: segmenter returned probabilities of shape (3,"), reason
    assert not list((tmp_path / "out").glob("*.nii.gz")) and not list((tmp_path / "out").rglob("*.png"))


def test_rerun_reuses_finished_scans_and_a_new_model_redoes_them(oblique_case, tmp_path):
    single = oblique_case / "in" / "img" / "img0001.nii.gz"            # one file as the input
    model = write_oracle(oblique_case / "in", tmp_path / "model", (3.0, 3.0, 3.0))
    first = _predict(single, tmp_path / "out", model)
    assert (first["items_processed"], first["counts"]["predicted"]) == (1, 1)
    label = next((tmp_path / "out").glob("*.nii.gz"))
    before = label.stat().st_mtime_ns
    (tmp_path / "out" / f".{label.name}.tmp-99.nii.gz").write_bytes(b"half")   # a killed run's leftover
    second = _predict(single, tmp_path / "out", model)
    assert (second["items_reused"], second["items_processed"]) == (1, 0)
    assert label.stat().st_mtime_ns == before and not list((tmp_path / "out").glob(".*"))
    assert _table(tmp_path / "out").status.tolist() == ["predicted"]
    other = write_oracle(oblique_case / "in", tmp_path / "model2", (2.0, 2.0, 2.0))
    third = _predict(single, tmp_path / "out", other)
    assert (third["items_reused"], third["items_processed"]) == (0, 1)


def test_model_settings_are_checked_before_any_scan_is_read(tmp_path):
    class Bad:
        spacing_zyx_mm, body_threshold_hu, label_names = (3.0, 3.0, 3.0), -500.0, ORGANS[:-1]

    with pytest.raises(UserError, match="label_names must be the 13 BTCV organs"):
        check_segmenter(Bad())
    Bad.label_names, Bad.spacing_zyx_mm = ORGANS, (3.0, 0.0, 3.0)
    with pytest.raises(UserError, match="spacing_zyx_mm must be 3 values"):
        check_segmenter(Bad())
    Bad.spacing_zyx_mm, Bad.island_fraction = (3.0, 3.0, 3.0), 1.5
    with pytest.raises(UserError, match="island_fraction must be a number in"):
        check_segmenter(Bad())
    with pytest.raises(ValueError, match="do not sum to 1"):
        checked_probs(np.full((14, 2, 2, 2), 0.5, np.float32), (2, 2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        checked_probs(np.full((14, 2, 2, 2), np.nan, np.float32), (2, 2, 2))


@pytest.mark.parametrize("uri", ["runs:/abc", "models:/name", "models:/name/v1", "models:/a@b@c"])
def test_malformed_model_uris_are_refused_naming_the_field(uri):
    with pytest.raises(ValueError, match="model"):
        PredictConfig(model=uri, input="in", output="out")


def test_missing_model_folder_or_input_is_one_clear_line(tmp_path, capsys):
    from jobs.predict import main

    (tmp_path / "scan.nii.gz").write_bytes(b"")
    assert main(["--model", str(tmp_path / "nope"), "--input", str(tmp_path / "scan.nii.gz"),
                 "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("does not exist: pass a segmenter folder, "
                                                    "runs:/<run_id>/<path> or models:/<name>@<alias>")
    assert main(["--model", str(tmp_path), "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "input '" in capsys.readouterr().err


def test_registered_and_run_model_uris_download_the_folder(tmp_path, monkeypatch):
    from pipeline import tracking

    folder = tmp_path / "segmenter"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "weights.bin").write_bytes(b"\1\2\3")
    (folder / "card.md").write_text("research use only")
    uri = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run(uri, "anatdiff", "segmenter")
    tracking.log_artifacts(uri, run_id, folder, "segmenter")
    version = tracking.register_model(uri, run_id, "segmenter", "anatdiff-segmenter", "best")
    for model in ("models:/anatdiff-segmenter@best", f"models:/anatdiff-segmenter/{version}",
                  f"runs:/{run_id}/segmenter"):
        local, tmp = model_folder(model, uri)
        try:
            assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
                ["card.md", "data/weights.bin"], model
        finally:
            assert tmp is not None and os.path.isdir(tmp)
            shutil.rmtree(tmp)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(UserError, match="cannot fetch model 'models:/anatdiff-segmenter@nope'"):
        model_folder("models:/anatdiff-segmenter@nope", uri)
    assert list((tmp_path / "tmp").iterdir()) == []  # a failed download leaves no temporary folder behind


def test_submit_validates_a_predict_config_before_any_upload(tmp_path):
    from pipeline.distributed.submit import validate_locally

    cfg = tmp_path / "predict.yaml"
    cfg.write_text("model: models:/anatdiff-segmenter\ninput: s3://ct/new\noutput: /shared/labels\n")
    with pytest.raises(UserError, match="is not runs:/<run_id>/<path>, models:/<name>@<alias>"):
        validate_locally("predict", cfg, [])
    cfg.write_text("model: models:/anatdiff-segmenter@best\ninput: s3://ct/new\noutput: /shared/labels\n")
    validate_locally("predict", cfg, ["gpus_per_actor=0.5"])
    with pytest.raises(UserError, match="field 'gpus_per_actr': unknown field"):
        validate_locally("predict", cfg, ["gpus_per_actr=1"])


REAL = Path(__file__).parent / "data" / "real-ct"


def test_real_ct_label_maps_land_on_the_real_headers(tmp_path):
    """Real headers: the BTCV abdomen (stored RAS: x and y flipped in LPS, int32 and int16) and the chest NRRD
    (anisotropic 2.3 x 2.3 x 5 mm). The abdomen's grid equals the model grid, so the round trip is exact."""
    model = write_oracle(REAL / "abdomen_btcv", tmp_path / "model", (3.0, 3.0, 3.0))
    report = _predict(REAL / "abdomen_btcv", tmp_path / "out", model, overlays=False)
    assert report["counts"] == {"predicted": 2, "rejected": 0, "skipped": 0}
    table = _table(tmp_path / "out")
    dice = table[[f"dice_{o}" for o in ORGANS if f"dice_{o}" in table]]
    assert dice.shape == (2, 12) and (dice.to_numpy() == 1.0).all()  # all but the esophagus (out of view)
    for row in table.itertuples():
        source = sitk.ReadImage(str(REAL / "abdomen_btcv" / row.source))
        assert np.allclose(np.asarray(source.GetDirection()).reshape(3, 3), np.diag([-1, -1, 1]))
        _assert_same_grid(sitk.ReadImage(str(tmp_path / "out" / row.label_path)), source)

    (tmp_path / "bone" / "oracle.json").parent.mkdir()
    np.savez(tmp_path / "bone" / "labels.npz")
    np.savez(tmp_path / "bone" / "volumes.npz")
    (tmp_path / "bone" / "oracle.json").write_text(json.dumps(
        {"spacing_zyx_mm": [3.0, 3.0, 3.0], "body_threshold_hu": -500.0, "mode": "bone-as-liver"}))
    chest = REAL / "chest" / "radiomics_lung1_ct_4x.nrrd"
    assert _predict(chest, tmp_path / "chest", tmp_path / "bone")["counts"]["predicted"] == 1
    source = sitk.ReadImage(str(chest))
    pred = sitk.ReadImage(str(tmp_path / "chest" / _table(tmp_path / "chest").label_path[0]))
    _assert_same_grid(pred, source)
    bone = (sitk.GetArrayFromImage(source) > 150) & (sitk.GetArrayFromImage(pred) > 0)
    assert bone.sum() > 0.5 * (sitk.GetArrayFromImage(pred) > 0).sum()  # the labels sit on the bones


def test_the_segmenters_island_removal_runs_on_the_scans_own_grid(tmp_path):
    """A segmenter with ``island_fraction`` 1 writes one component per organ: the bone-as-liver oracle marks every
    bone of the chest CT (ribs, spine: many components) as liver."""
    from scipy import ndimage

    chest = REAL / "chest" / "radiomics_lung1_ct_4x.nrrd"
    livers = {}
    for fraction in (0.0, 1.0):
        folder = tmp_path / f"model-{fraction}"
        folder.mkdir()
        np.savez(folder / "labels.npz")
        np.savez(folder / "volumes.npz")
        (folder / "oracle.json").write_text(json.dumps({"spacing_zyx_mm": [3.0, 3.0, 3.0], "body_threshold_hu":
                                                        -500.0, "mode": "bone-as-liver", "island_fraction": fraction}))
        out = tmp_path / f"out-{fraction}"
        assert _predict(chest, out, folder)["counts"]["predicted"] == 1
        pred = sitk.ReadImage(str(out / _table(out).label_path[0]))
        _assert_same_grid(pred, sitk.ReadImage(str(chest)))
        livers[fraction] = sitk.GetArrayFromImage(pred) == ORGAN_TO_LABEL["liver"]
    full = ndimage.generate_binary_structure(3, 3)
    assert ndimage.label(livers[0.0], full)[1] > 1
    assert ndimage.label(livers[1.0], full)[1] == 1
    assert not (livers[1.0] & ~livers[0.0]).any()
    assert livers[1.0].sum() < livers[0.0].sum()
