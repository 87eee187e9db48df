"""The CT phantom generator: determinism, anatomy, HU, fields of view, geometry, writers and corpus layout."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.config import SynthConfig, UserError
from pipeline.labels import ORGAN_TO_LABEL, ORGANS
from pipeline.synth.anatomy import VERTEBRAE, anatomical_coordinates, body_to_world, world_to_body
from pipeline.synth.corpus import synthesize_corpus
from pipeline.synth.phantom import make_phantom
from pipeline.synth.scanners import PROFILES, scan_spacing_zyx_mm
from pipeline.synth.writers import write_dicom_series, write_nifti

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


@lru_cache(maxsize=None)
def _cap(index: int, contrast: str = "none"):
    return make_phantom(5, index, spacing_mm=6.0, fov="chest_abdomen_pelvis", contrast=contrast)


def _centroid(ph, organ: str) -> np.ndarray:
    return np.array(ph.meta["organs"][organ]["centroid_xyz_mm"])


def test_same_seed_index_gives_identical_arrays_and_meta():
    a = make_phantom(3, 1, spacing_mm=8.0)
    b = make_phantom(3, 1, spacing_mm=8.0)
    assert a.image_hu_zyx.dtype == np.int16 and a.label_zyx.dtype == np.uint8
    assert a.image_hu_zyx.tobytes() == b.image_hu_zyx.tobytes()
    assert a.label_zyx.tobytes() == b.label_zyx.tobytes()
    assert json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)
    c = make_phantom(3, 2, spacing_mm=8.0)
    assert c.image_hu_zyx.shape != a.image_hu_zyx.shape or not np.array_equal(c.image_hu_zyx, a.image_hu_zyx)
    assert make_phantom(3, 1, spacing_mm=8.0, with_labels=False).label_zyx is None


def test_cap_phantom_holds_all_13_organs_and_chest_lacks_the_lower_abdomen():
    for index in range(2):
        cap = _cap(index)
        assert set(np.unique(cap.label_zyx)) == set(range(14))
        assert cap.meta["fov"]["name"] == "chest_abdomen_pelvis"
        chest = make_phantom(5, index, spacing_mm=6.0, fov="chest", contrast="none")   # same patient
        organs = chest.meta["organs"]
        assert "liver" in organs and "esophagus" in organs and "aorta" in organs
        assert organs.get("pancreas", {"voxels": 0})["voxels"] < 0.1 * cap.meta["organs"]["pancreas"]["voxels"]
        for kidney in ("kidney_left", "kidney_right"):
            assert organs.get(kidney, {"voxels": 0})["voxels"] < 0.3 * cap.meta["organs"][kidney]["voxels"]
        assert chest.image_hu_zyx.shape[0] < cap.image_hu_zyx.shape[0]


def _median_hu(ph, organ: str) -> float:
    from scipy.ndimage import binary_erosion
    mask = ph.label_zyx == ORGAN_TO_LABEL[organ]
    core = binary_erosion(mask)
    return float(np.median(ph.image_hu_zyx[core if core.sum() >= 20 else mask]))


@pytest.mark.parametrize("contrast, expected", [
    ("none", {"liver": (55, 65), "spleen": (45, 50), "kidney_left": (30, 35), "kidney_right": (30, 35),
              "pancreas": (40, 50), "aorta": (35, 45), "gallbladder": (0, 20)}),
    ("portal_venous", {"liver": (100, 120), "spleen": (110, 130), "aorta": (150, 180), "pancreas": (90, 110),
                       "inferior_vena_cava": (110, 130), "gallbladder": (0, 20)}),
])
def test_median_organ_hu_follows_the_reference_table(contrast, expected):
    ph = _cap(0, contrast)
    tol = 6.0 + abs(ph.scanner.hu_offset)        # median of noisy, partial-volumed voxels
    for organ, (lo, hi) in expected.items():
        assert lo - tol <= _median_hu(ph, organ) <= hi + tol, organ


def test_left_and_right_kidney_hu_overlap_so_only_position_separates_them():
    ph = _cap(1)
    left = ph.image_hu_zyx[ph.label_zyx == ORGAN_TO_LABEL["kidney_left"]].astype(float)
    right = ph.image_hu_zyx[ph.label_zyx == ORGAN_TO_LABEL["kidney_right"]].astype(float)
    assert abs(np.median(left) - np.median(right)) < 0.5 * ph.scanner.noise_sd_hu + 3.0
    assert np.percentile(left, 25) < np.percentile(right, 75) and np.percentile(right, 25) < np.percentile(left, 75)
    liver = ph.image_hu_zyx[ph.label_zyx == ORGAN_TO_LABEL["liver"]].astype(float)
    assert np.percentile(liver, 5) < np.percentile(left, 95)   # non-contrast liver and kidney overlap too


def test_anatomical_arrangement_in_lps():
    for index in range(2):
        ph = _cap(index)
        c = {o: _centroid(ph, o) for o in ORGANS}
        assert c["liver"][0] < c["spleen"][0]                        # liver on the right (lower x)
        assert c["inferior_vena_cava"][0] < c["aorta"][0]            # aorta left of the IVC
        assert c["kidney_right"][0] < c["kidney_left"][0]
        for kidney in ("kidney_left", "kidney_right"):
            assert c[kidney][1] > c["pancreas"][1] and c[kidney][1] > c["stomach"][1]   # posterior
        assert c["kidney_right"][2] < c["kidney_left"][2]            # the right kidney sits lower
        assert c["gallbladder"][1] < c["kidney_right"][1]            # gallbladder anterior
        lm = ph.meta["landmarks"]
        assert lm["lung_apex_right"][2] > c["liver"][2] + 100.0      # lungs above the liver
        zs = [lm["vertebrae"][n][2] for n in VERTEBRAE]
        assert all(a > b for a, b in zip(zs, zs[1:]))                # C7 ... S1 going down
        body = ph.image_hu_zyx[ph.label_zyx == 0]
        assert (body < -600).any()                                   # lungs / air present


def test_fields_of_view_scanners_and_placement_vary():
    metas = [make_phantom(11, i, spacing_mm=10.0).meta for i in range(10)]
    assert len({m["fov"]["name"] for m in metas}) >= 3
    assert len({m["scanner"]["name"] for m in metas}) >= 4
    l1_z = [m["landmarks"]["vertebrae"]["L1"][2] for m in metas]
    assert np.ptp(l1_z) > 150.0                  # scanner z does not tell the anatomical level
    centre_x = [m["landmarks"]["body_centre_line"]["T12"][0] for m in metas]
    assert np.ptp(centre_x) > 10.0


def test_scanner_spacing_defaults_vary_and_spacing_mm_forces_isotropic():
    spacings = {scan_spacing_zyx_mm(p, None) for p in PROFILES}
    assert len(spacings) >= 4
    for sz, sy, sx in spacings:
        assert 0.8 * 3.0 - 1e-6 <= sx <= 1.2 * 3.0 + 1e-6 and sy == sx
        assert 2.0 - 0.1 <= sz <= 5.1
    assert make_phantom(0, 0, spacing_mm=7.0).spacing_zyx_mm == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        make_phantom(0, 0, spacing_mm=0.0)


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1, 0)
    with pytest.raises(ValueError, match="fov 'pelvis'"):
        make_phantom(0, 0, spacing_mm=8.0, fov="pelvis")
    with pytest.raises(ValueError, match="scanner 'x'"):
        make_phantom(0, 0, spacing_mm=8.0, scanner="x")
    with pytest.raises(UserError, match="seed"):
        synthesize_corpus(SynthConfig(out=str(tmp_path / "o"), n=1, seed=-2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        synthesize_corpus(SynthConfig(out=str(tmp_path / "file"), n=1))


def test_anatomical_coordinates_match_the_landmarks():
    ph = _cap(0)
    frame, lm = ph.meta["frame"], ph.meta["landmarks"]
    vert = np.array([lm["vertebrae"][n] for n in VERTEBRAE])
    coords = anatomical_coordinates(vert, frame)
    np.testing.assert_allclose(coords[:, 2], np.arange(len(VERTEBRAE)), atol=0.02)   # SI = vertebral level
    line = anatomical_coordinates(np.array([lm["body_centre_line"][n] for n in VERTEBRAE]), frame)
    np.testing.assert_allclose(line[:, :2], 0.0, atol=0.01)
    assert coords[VERTEBRAE.index("L3"), 1] > 0.0                      # spine is posterior
    lr = anatomical_coordinates(np.array([_centroid(ph, "liver"), _centroid(ph, "spleen")]), frame)[:, 0]
    assert lr[0] < 0 < lr[1]
    pts = np.array([[10.0, -20.0, 300.0], [-50.0, 40.0, 0.0]])
    np.testing.assert_allclose(world_to_body(body_to_world(pts, frame), frame), pts, atol=1e-3)


def _read_nifti(path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def test_nifti_geometry_round_trip(tmp_path):
    ph = make_phantom(2, 3, spacing_mm=8.0)
    write_nifti(tmp_path / "a.nii.gz", ph.image_hu_zyx, ph.spacing_zyx_mm, ph.origin_xyz_mm)
    arr, img = _read_nifti(tmp_path / "a.nii.gz")
    assert arr.dtype == np.int16 and np.array_equal(arr, ph.image_hu_zyx)
    np.testing.assert_allclose(img.GetSpacing()[::-1], ph.spacing_zyx_mm)
    np.testing.assert_allclose(img.GetOrigin(), ph.origin_xyz_mm, atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel())


def test_dicom_series_round_trip_geometry_tags_and_uids(tmp_path):
    ph = make_phantom(2, 4, spacing_mm=8.0, contrast="arterial")
    folder = write_dicom_series(tmp_path / "case", ph.image_hu_zyx, ph.meta)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(files) == ph.image_hu_zyx.shape[0]
    reader.SetFileNames(files)
    img = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(img).astype(np.int16), ph.image_hu_zyx)
    np.testing.assert_allclose(img.GetSpacing()[::-1], ph.spacing_zyx_mm, atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), ph.origin_xyz_mm, atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    sop = set()
    for f in files[:3]:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.ReadImageInformation()
        tag = r.GetMetaData
        assert tag("0008|0060").strip() == "CT"
        assert tag("0008|0070").strip() == ph.scanner.manufacturer
        assert tag("0008|1090").strip() == ph.scanner.model and tag("0018|1210").strip() == ph.scanner.kernel
        assert tag("0018|0060").strip() == str(ph.scanner.kvp) and tag("0018|0010").strip()
        assert tag("0010|0010").strip() == f"PHANTOM^{ph.meta['case_id']}" and tag("0010|0020").strip() == "PH-2-4"
        for key in ("0020|000d", "0020|000e", "0008|0018"):
            uid = tag(key).strip().rstrip("\x00")
            assert UID.match(uid) and len(uid) <= 64, uid
        sop.add(tag("0008|0018"))
    assert len(sop) == 3


def test_labelled_corpus_layout_pairs_every_image_with_its_label(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "c"), n=2, seed=9, labels=True, spacing_mm=10.0, workers=1)
    seen = []
    records = synthesize_corpus(cfg, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (2, 2) and [r["case_id"] for r in records] == ["phantom_9_0000", "phantom_9_0001"]
    doc = json.loads((tmp_path / "c" / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "CT"} and doc["file_ending"] == ".nii.gz" and doc["numTraining"] == 2
    assert doc["labels"] == {"background": 0, **{o: i + 1 for i, o in enumerate(ORGANS)}}
    for pair in doc["training"]:
        image, label = tmp_path / "c" / pair["image"], tmp_path / "c" / pair["label"]
        img_arr, img = _read_nifti(image)
        lab_arr, lab = _read_nifti(label)
        assert img_arr.shape == lab_arr.shape and lab_arr.dtype == np.uint8
        assert img.GetOrigin() == lab.GetOrigin() and img.GetSpacing() == lab.GetSpacing()
        case = label.name.replace(".nii.gz", "")
        assert image.name == f"{case}_0000.nii.gz"
        meta = json.loads((tmp_path / "c" / "meta" / f"{case}.json").read_text())
        assert meta["case_id"] == case and "vertebrae" in meta["landmarks"]


def test_process_pool_writes_the_same_volumes_as_one_process(tmp_path):
    one = synthesize_corpus(SynthConfig(out=str(tmp_path / "a"), n=2, seed=4, spacing_mm=10.0, workers=1))
    two = synthesize_corpus(SynthConfig(out=str(tmp_path / "b"), n=2, seed=4, spacing_mm=10.0, workers=2))
    for r1, r2 in zip(one, two):
        assert r1["label"] is None and r1["image"].endswith(f"{r1['case_id']}.nii.gz")
        assert np.array_equal(_read_nifti(r1["image"])[0], _read_nifti(r2["image"])[0])
