"""Real-world archives and hostile inputs, each generated here: every one ends as a manifest row with a reason
(or an accepted item with the right geometry), never as a crash of the job. The whole job runs in this
process (``map_units_in_process``: discovery, the workers' code, duplicates, manifest, private mapping)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_factory import (write_ct_series, write_ct_slice, write_dicomdir_stub, write_dose_report,
                           write_enhanced_ct)
from ingest_helpers import manifest_with_sources
from pipeline.config import PreprocessConfig
from pipeline.distributed.ingest import map_units_in_process, run_preprocess
from pipeline.ingest.qc import check_complete
from pipeline.io.readers import nifti_data_bytes

ROOT = Path(__file__).resolve().parents[1]


def body_zyx(n_z=10, size=24) -> np.ndarray:
    """int16 HU: air around a 40 HU box with a 300 HU core."""
    vol = np.full((n_z, size, size), -1000, np.int16)
    vol[:, 3:size - 3, 3:size - 3] = 40
    vol[:, 9:12, 9:12] = 300
    return vol


def nifti(path: Path, array, spacing=(1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def job(tmp_path: Path, **cfg_kw):
    """Preprocess tmp_path/in into tmp_path/out (in this process); the manifest with its private sources."""
    cfg = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), log_to_mlflow=False,
                           target_spacing_zyx_mm=(2.0, 2.0, 2.0), **cfg_kw)
    run_preprocess(cfg, progress=False, map_units=map_units_in_process)
    df = manifest_with_sources(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["files"]["missing"] == report["files"]["duplicated"] == 0, report["files"]
    for reason in df["reason"].dropna():
        assert str(tmp_path) not in reason and "/in/" not in reason, reason
    return df


def outcome(df, source: str) -> tuple[str, str | None]:
    """(status, reason) of the row of ``source`` (reason None when accepted)."""
    row = df.set_index("source").loc[source]
    return row["status"], (None if row["reason"] is None or row["reason"] != row["reason"] else row["reason"])


# --- files: empty, tiny, bombs, 4-D, links, fifos, unreadable --------------------------------------------------
def test_empty_and_one_byte_files_with_image_endings(tmp_path):
    nifti(tmp_path / "in" / "good.nii.gz", body_zyx())
    for name, data in (("empty.nii.gz", b""), ("one.nii", b"\x5c"), ("empty.nrrd", b""), ("one.mha", b"O")):
        (tmp_path / "in" / name).write_bytes(data)
    write_ct_series(tmp_path / "in" / "series", body_zyx() + 1024, intercept=-1024)
    (tmp_path / "in" / "series" / "IM0011.dcm").write_bytes(b"")          # an empty slice beside a series
    (tmp_path / "in" / "alone").mkdir()
    (tmp_path / "in" / "alone" / "x.dcm").write_bytes(b"D")               # 1 byte, no series to belong to
    df = job(tmp_path)
    assert outcome(df, "good.nii.gz") == ("accepted", None)
    assert outcome(df, "empty.nii.gz") == ("rejected", "unreadable: empty file (0 bytes)")
    assert outcome(df, "one.nii") == ("rejected", "unreadable: 1 byte, too short for a nifti image")
    assert outcome(df, "empty.nrrd") == ("rejected", "unreadable: empty file (0 bytes)")
    assert outcome(df, "one.mha") == ("rejected", "unreadable: 1 byte, too short for a mha image")
    assert outcome(df, "series") == ("rejected", "damaged slice: file 11 of 11 of this series is empty (0 bytes)")
    assert outcome(df, "alone/x.dcm") == ("skipped", "not an image file (no DICOM header; .dcm)")


def _gzip_bomb(path: Path, header_zyx=(10, 24, 24), extra_bytes=64 << 20) -> Path:
    """A .nii.gz whose header promises a small int16 volume but whose stream goes on with ``extra_bytes``
    zeros (a 64 MiB stream in ~64 KiB)."""
    plain = nifti(path.with_suffix(""), body_zyx(*header_zyx[:1], header_zyx[1])).read_bytes()
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(plain)
        zeros = bytes(1 << 20)
        for _ in range(extra_bytes >> 20):
            f.write(zeros)
    path.with_suffix("").unlink()
    return path


def test_gzip_bomb_is_refused_while_streaming_in_bounded_memory(tmp_path):
    bomb = _gzip_bomb(tmp_path / "in" / "bomb.nii.gz")
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    t0 = time.perf_counter()
    expected, stored = nifti_data_bytes(bomb)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert expected == 10 * 24 * 24 * 2 and expected + (1 << 20) < stored <= expected + (1 << 20) + (8 << 20)
    assert peak < 16 << 20, f"{peak / 2 ** 20:.1f} MiB held while streaming a 64 MiB bomb"
    assert seconds < 5
    with pytest.raises(Exception, match="oversized: the compressed stream holds more than"):
        check_complete(expected, stored)
    # the job: max_voxels 20000 (the bomb's stream is 3000x that); and a header that is honest about a size
    # above max_voxels is refused before any byte of its stream is read
    nifti(tmp_path / "in" / "huge.nii.gz", body_zyx(40, 32))
    df = job(tmp_path, max_voxels=20_000)
    status, reason = outcome(df, "bomb.nii.gz")
    assert status == "rejected" and reason.startswith("oversized: the compressed stream holds more than"), reason
    assert outcome(df, "huge.nii.gz") == ("rejected", "too large: 40960 voxels > max_voxels 20000")


def test_4d_nifti_is_rejected(tmp_path):
    frames = [sitk.GetImageFromArray(body_zyx()) for _ in range(3)]
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "in" / "dynamic.nii.gz"))
    status, reason = outcome(job(tmp_path), "dynamic.nii.gz")
    assert status == "rejected" and reason.startswith("not a 3-D image: 4-D, size (24, 24, 10, 3)"), reason


def test_symlink_loops_broken_links_and_fifos_are_reported_never_followed(tmp_path):
    inp = tmp_path / "in"
    nifti(inp / "a" / "ct.nii.gz", body_zyx())
    os.symlink("..", inp / "a" / "up")                          # a folder loop
    os.symlink("self.nii.gz", inp / "a" / "self.nii.gz")        # a link to itself
    os.symlink("nowhere.nii.gz", inp / "a" / "gone.nii.gz")     # a broken link
    os.mkfifo(inp / "a" / "pipe.nii.gz")                        # would block forever if opened
    outside = tmp_path / "elsewhere"
    nifti(outside / "linked.nii.gz", body_zyx(12))
    os.symlink(outside, inp / "b")                              # a link to a folder outside: read once
    os.symlink(inp / "b", inp / "a" / "b-again")                # ... not twice
    df = job(tmp_path)
    assert outcome(df, "a/ct.nii.gz") == ("accepted", None)
    assert outcome(df, "b/linked.nii.gz") == ("accepted", None)
    assert outcome(df, "a/up") == ("skipped", "symbolic link to a folder inside the input (read there, not twice)")
    assert outcome(df, "a/b-again") == ("skipped", "symbolic link to a folder already read (a loop, or a second "
                                                   "link to it)")
    assert outcome(df, "a/self.nii.gz") == ("skipped", "symbolic link loop")
    assert outcome(df, "a/gone.nii.gz") == ("skipped", "broken symbolic link (its target does not exist)")
    assert outcome(df, "a/pipe.nii.gz") == ("skipped", "not a regular file (fifo; never opened)")
    assert len(df) == 7


_UNREADABLE_JOB = """
import json, sys
sys.path.insert(0, "tests")
from test_hostile_inputs import job
from pathlib import Path
df = job(Path(sys.argv[1]))
print(json.dumps({s: [st, r] for s, st, r in zip(df["source"], df["status"], df["reason"])}))
"""


def test_unreadable_files_are_rejected_with_their_reason(tmp_path):
    """A file without read permission, alone and as one slice of a series. Root reads anything, so as root
    the job runs without the capabilities that bypass file permissions (``setpriv``)."""
    inp = tmp_path / "in"
    nifti(inp / "locked.nii.gz", body_zyx()).chmod(0)
    slices = write_ct_series(inp / "series", body_zyx() + 1024, intercept=-1024)
    slices[3].chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
    run = subprocess.run(prefix + [sys.executable, "-c", _UNREADABLE_JOB, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert rows["locked.nii.gz"] == ["rejected", "unreadable: permission denied"]
    assert rows["series"] == ["rejected", "damaged slice: file 10 of 10 of this series cannot be read "
                                          "(Permission denied)"]


# --- DICOM as exported: names, DICOMDIR, enhanced, tilted, mixed, copies, rescale ------------------------------
def test_dicom_by_content_uid_names_im_names_and_a_dicomdir_export(tmp_path):
    inp = tmp_path / "in"
    uid = "1.2.826.0.1.3680043.8.498.1"
    write_ct_series(inp / "uids", body_zyx() + 1024, intercept=-1024,
                    names=[f"1.3.12.2.1107.5.1.4.{k + 100}" for k in range(10)])
    write_ct_series(inp / "ct-prefix", body_zyx() + 1024, intercept=-1024,
                    names=[f"CT.1.2.840.113619.2.{k}" for k in range(10)])
    # a CD export: DICOMDIR at the top, one series split over two folders, IM names without extension
    write_dicomdir_stub(inp / "cd" / "DICOMDIR")
    stored = body_zyx(12) + 1024
    for k in range(12):
        folder = inp / "cd" / "DICOM" / "PA000000" / "ST000000" / ("SE000000" if k < 6 else "SE000001")
        write_ct_slice(folder / f"IM{k:06d}", stored[k], (0.0, 0.0, 2.0 * k), uid, intercept=-1024, instance=k + 1)
    (inp / "cd" / "README.TXT").write_text("Viewer on this disc")
    df = job(tmp_path)
    assert outcome(df, "uids") == ("accepted", None) and outcome(df, "ct-prefix") == ("accepted", None)
    cd = df.set_index("source").loc["cd"]
    assert cd["status"] == "accepted" and list(cd["source_shape"]) == [12, 24, 24], cd["reason"]
    assert outcome(df, "cd/DICOMDIR") == ("skipped", "DICOM without an image (media directory (DICOMDIR))")
    assert outcome(df, "cd/README.TXT") == ("skipped", "not an image file (.TXT)")


def test_enhanced_multiframe_ct_is_rejected_with_a_reason(tmp_path):
    write_enhanced_ct(tmp_path / "in" / "enhanced" / "ENH0001", body_zyx() + 1024)
    assert outcome(job(tmp_path), "enhanced") == (
        "rejected", "multi-frame DICOM: one file holds 10 frames (an enhanced CT); convert it to one file per "
                    "slice or to NIfTI first (e.g. dcm2niix)")


def _tilted_series(folder: Path, tilt_deg: float, n: int = 20, step_mm: float = 3.0) -> None:
    """A gantry-tilted CT of a rod along the patient's z axis (x = y = 12 mm, radius 3 mm) in a 40 HU body:
    slice planes tilted by ``tilt_deg`` about x, stepping ``step_mm`` along z (a sheared grid)."""
    t = np.radians(tilt_deg)
    col = (0.0, np.cos(t), np.sin(t))
    j, i = np.mgrid[0:24, 0:24].astype(float)
    x, y = i, j * np.cos(t)                      # physical x, y of pixel (i, j); z does not matter for a rod
    hu = np.where((np.abs(x - 12) < 9) & (np.abs(y - 12) < 9), 40, -1000)
    hu = np.where((x - 12) ** 2 + (y - 12) ** 2 < 9, 300, hu).astype(np.int16)
    uid = "1.2.826.0.1.3680043.8.498.7"
    for k in range(n):
        write_ct_slice(folder / f"IM{k:04d}", hu + 1024, (0.0, 0.0, step_mm * k), uid, intercept=-1024,
                       orientation=(1.0, 0.0, 0.0, *col), instance=k + 1, tags={"GantryDetectorTilt": f"{tilt_deg:g}"})


def test_gantry_tilted_series_is_resampled_with_its_shear(tmp_path):
    """The rod is parallel to z in physical space; read as an orthogonal stack (what ITK's series reader
    assumes) it would drift by sin(25 deg) * 57 mm = 24 mm from the first to the last slice."""
    _tilted_series(tmp_path / "in" / "tilted", 25.0)
    df = job(tmp_path)
    row = df.set_index("source").loc["tilted"]
    assert row["status"] == "accepted", row["reason"]
    vol = np.load(tmp_path / "out" / row["image_path"])
    origin_y, spacing = row["origin_xyz_mm"][1], 2.0
    centres = []
    for k in range(vol.shape[0]):
        rod = vol[k] > 170
        if rod.sum() >= 3:
            centres.append(origin_y + spacing * np.nonzero(rod)[0].mean())
    assert len(centres) >= 10
    assert max(centres) - min(centres) < 1.5, f"the rod drifts along z: y from {min(centres):.1f} to {max(centres):.1f}"
    assert abs(np.mean(centres) - 12.0) < 1.5


def test_mixed_ct_mr_and_dose_report_in_one_folder(tmp_path):
    folder = tmp_path / "in" / "study"
    write_ct_series(folder, body_zyx() + 1024, intercept=-1024, names=[f"CT{k:03d}" for k in range(10)])
    write_ct_series(folder, body_zyx(9) + 1000, modality="MR", names=[f"MR{k:03d}" for k in range(9)])
    write_dose_report(folder / "SR0001")
    df = job(tmp_path)
    items = df[df.status != "skipped"].sort_values("status")
    assert list(items["status"]) == ["accepted", "rejected"]
    assert items.iloc[0]["source_shape"][0] == 10 and items.iloc[1]["reason"] == "not CT: modality MR"
    assert outcome(df, "study/SR0001") == ("skipped", "DICOM without an image (structured report)")


def test_a_series_copied_into_two_folders_is_ingested_once(tmp_path):
    write_ct_series(tmp_path / "in" / "export1" / "series", body_zyx() + 1024, intercept=-1024)
    shutil.copytree(tmp_path / "in" / "export1", tmp_path / "in" / "export2")
    df = job(tmp_path)
    items = df[df.status != "skipped"].set_index("source")
    kept, copy = items.loc["export1/series"], items.loc["export2/series"]
    assert {kept["status"], copy["status"]} == {"accepted", "rejected"}
    if kept["status"] != "accepted":
        kept, copy = copy, kept
    assert copy["reason"] == (f"duplicate series: a copy of item {kept['item_id']} (10 files here, 10 there); "
                              "ingested once")
    assert sorted(p.name for p in (tmp_path / "out" / "volumes").iterdir()) == [f"{kept['item_id']}.npy"]
    # a rerun reaches the same result
    again = job(tmp_path)
    assert sorted(again["status"]) == sorted(df["status"]) and set(again["reason"].dropna()) == {copy["reason"]}


def test_slices_with_different_rescale_slopes_keep_their_hu(tmp_path):
    hu = body_zyx().astype(np.float64)
    hu[:, 5:8, 14:20] = 1234.0
    write_ct_series(tmp_path / "in" / "uniform", (hu + 1024).astype(np.int16), intercept=-1024)
    uid = "1.2.826.0.1.3680043.8.498.9"
    for k in range(len(hu)):
        slope, intercept = (1.0, -1024.0) if k % 2 == 0 else (0.37, -1000.0)
        write_ct_slice(tmp_path / "in" / "mixed" / f"IM{k:04d}", np.round((hu[k] - intercept) / slope), (0, 0, 2.0 * k),
                       uid, slope=slope, intercept=intercept, instance=k + 1)
    df = job(tmp_path).set_index("source")
    assert (df.loc[["uniform", "mixed"], "status"] == "accepted").all(), df["reason"]
    a, b = (np.load(tmp_path / "out" / df.loc[s, "image_path"]).astype(int) for s in ("uniform", "mixed"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_damaged_slice_is_one_rejection_naming_the_file(tmp_path):
    slices = write_ct_series(tmp_path / "in" / "series", body_zyx() + 1024, intercept=-1024)
    data = slices[4].read_bytes()
    slices[4].write_bytes(data[: len(data) - 300])
    df = job(tmp_path)
    assert len(df) == 1
    assert outcome(df, "series") == ("rejected", "damaged slice: file 10 of 10 of this series is cut short "
                                                 "(852 of 1152 pixel bytes present)")
    assert sorted(df.iloc[0]["files"])[4] == "series/IM0005"
    readable = job(tmp_path, readable_ids=True)
    assert outcome(readable, "series")[1].startswith("damaged slice: file 10 of 10 (IM0005) of this series is cut")


# --- NIfTI geometry by the NIfTI rules --------------------------------------------------------------------------
def _patched_nifti(path: Path, pixdim=None, sform=None, sform_code=None, qform_code=None) -> Path:
    """An uncompressed NIfTI-1 (24 x 24 x 10 body, 1 x 1 x 2 mm) with header fields overwritten."""
    nifti(path, body_zyx())
    raw = bytearray(path.read_bytes())
    if pixdim is not None:
        raw[80:92] = struct.pack("<3f", *pixdim)
    if qform_code is not None:
        raw[252:254] = struct.pack("<h", qform_code)
    if sform_code is not None:
        raw[254:256] = struct.pack("<h", sform_code)
    if sform is not None:
        raw[280:328] = struct.pack("<12f", *np.asarray(sform, dtype=float).ravel())
    path.write_bytes(bytes(raw))
    return path


def test_nifti_geometry_follows_sform_qform_pixdim_and_refuses_disagreement(tmp_path):
    inp = tmp_path / "in"
    lps = [[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 2, 0]]                    # what SimpleITK writes (RAS rows)
    _patched_nifti(inp / "good.nii")
    _patched_nifti(inp / "pixdim0.nii", pixdim=(1.0, 1.0, 0.0), sform=[[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1.5, 0]])
    _patched_nifti(inp / "qform-off.nii", sform=[[-1, 0, 0, 40], [0, -1, 0, 0], [0, 0, 2, 0]])
    _patched_nifti(inp / "sheared.nii", sform=[[-1, 0, 0.5, 0], [0, -1, 0, 0], [0, 0, 2, 0]])
    _patched_nifti(inp / "no-codes.nii", sform=lps, sform_code=0, qform_code=0)
    _patched_nifti(inp / "degenerate.nii", pixdim=(1.0, 0.0, 2.0), sform_code=0)
    df = job(tmp_path)
    assert outcome(df, "good.nii") == ("accepted", None)
    assert outcome(df, "pixdim0.nii") == (
        "rejected", "inconsistent geometry: pixdim says (1, 1, 0) mm but the sform says (1, 1, 1.5) mm per voxel "
                    "(x, y, z)")
    assert outcome(df, "qform-off.nii") == (
        "rejected", "inconsistent geometry: the NIfTI sform and qform place the image up to 40.0 mm apart")
    assert outcome(df, "sheared.nii") == (
        "rejected", "bad geometry: the NIfTI sform is sheared (voxel axes 14.04 degrees off perpendicular); "
                    "SimpleITK would read it as a rotation")
    assert outcome(df, "no-codes.nii")[0] == "accepted"
    assert outcome(df, "degenerate.nii") == ("rejected", "bad geometry: the NIfTI qform is degenerate (voxel axes "
                                                         "(1, 0, 2) mm)")
    good = df.set_index("source").loc["good.nii"]
    assert list(good["spacing_mm"]) == [2.0, 1.0, 1.0]
