"""No patient identifier leaves the input: identifiers planted in folder names, file names, DICOM tags and
patients.csv; the real CLI runs preprocess (Ray), a random-init pretrain and an evaluate (Ray) on the result;
then the output folder (except private/), the MLflow store (database and artifacts), Ray's log folder, stdout
and stderr are searched: nothing is found. private/sources.csv holds the names (so the search can find them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_factory import write_ct_slice
from pipeline.synth.phantom import make_phantom

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[1]
NIFTI_CASE, DICOM_CASE, OTHER_CASE = "DOE_JOHN_MRN-4455", "SMITH_ANNA_MRN-7788", "ROE_RICHARD_MRN-1234"
TAGS = {"PatientName": "SMITH^ANNA", "PatientID": "MRN-7788-PHI", "InstitutionName": "SAINT PHI HOSPITAL",
        "AccessionNumber": "ACC-99881-PHI", "PatientBirthDate": "19580317", "ReferringPhysicianName": "HOUSE^GREGORY"}
CSV_PATIENT = "MRN-4455-PHI"
SECRET = "phi-test-secret-5a1f0c3e9b"
PLANTED = [NIFTI_CASE, DICOM_CASE, OTHER_CASE, "DOE_JOHN", "SMITH_ANNA", "ROE_RICHARD", "SMITH^ANNA",
           "MRN-7788", "MRN-4455", "MRN-1234", "SAINT PHI HOSPITAL", "ACC-99881", "19580317", "HOUSE^GREGORY",
           SECRET]


def _nifti(path: Path, array, spacing_zyx, origin_xyz) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    img.SetOrigin([float(o) for o in origin_xyz])
    sitk.WriteImage(img, str(path))


def _corpus(inp: Path) -> None:
    """nnU-Net v2 layout: two NIfTI cases and one DICOM case named after patients, with labels; patients.csv;
    a PDF, an extra channel and a cut NIfTI carrying names too."""
    for index, case in enumerate((NIFTI_CASE, DICOM_CASE, OTHER_CASE)):
        ph = make_phantom(7, index, spacing_mm=6.0)
        _nifti(inp / "labelsTr" / f"{case}.nii.gz", ph.label_zyx, ph.spacing_zyx_mm, ph.origin_xyz_mm)
        if case != DICOM_CASE:
            _nifti(inp / "imagesTr" / f"{case}_0000.nii.gz", ph.image_hu_zyx, ph.spacing_zyx_mm, ph.origin_xyz_mm)
            continue
        sz, sy, sx = ph.spacing_zyx_mm
        ox, oy, oz = ph.origin_xyz_mm
        for k, hu in enumerate(ph.image_hu_zyx):
            write_ct_slice(inp / "imagesTr" / f"{case}_0000" / f"{case}_IM{k:04d}.dcm", hu.astype(np.int32) + 1024,
                           (ox, oy, oz + k * sz), "1.2.826.0.1.3680043.8.498.4455", spacing_yx_mm=(sy, sx),
                           intercept=-1024, instance=k + 1, tags=TAGS)
    (inp / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "spleen": 1}}))
    (inp / "patients.csv").write_text(f"source,patient\nimagesTr/{NIFTI_CASE}_0000.nii.gz,{CSV_PATIENT}\n")
    (inp / f"{NIFTI_CASE}_report.pdf").write_bytes(b"%PDF-1.4 " + NIFTI_CASE.encode())
    shutil.copy(inp / "imagesTr" / f"{OTHER_CASE}_0000.nii.gz", inp / "imagesTr" / f"{OTHER_CASE}_0001.nii.gz")
    cut = (inp / "imagesTr" / f"{OTHER_CASE}_0000.nii.gz").read_bytes()
    (inp / "imagesTs").mkdir()
    (inp / "imagesTs" / f"{OTHER_CASE}_broken.nii.gz").write_bytes(cut[: len(cut) // 3])


def _cli(args: list[str], env: dict, log: list) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                         encoding="utf-8", errors="replace", timeout=1200)
    log.append(run)
    return run


def _hits(blobs: dict[str, bytes]) -> dict[str, list[str]]:
    return {token: [name for name, blob in blobs.items() if token.encode() in blob] for token in PLANTED
            if any(token.encode() in blob for blob in blobs.values())}


def test_no_identifier_reaches_outputs_mlflow_logs_or_the_terminal(tmp_path):
    inp, out, ml = tmp_path / "in", tmp_path / "out", tmp_path / "ml"
    _corpus(inp)
    ml.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="aphi-", dir="/tmp")   # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "ANATDIFF_PHI"))}
    env.update(RAY_TMPDIR=ray_tmp, MLFLOW_TRACKING_URI=f"sqlite:///{ml / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    runs: list[subprocess.CompletedProcess] = []
    try:
        # without a secret the job refuses at once, in one line that says how to set it
        refused = _cli(["jobs.preprocess", "--input", str(inp), "--output", str(out)], env, runs)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        lines = [line for line in refused.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1 and "ANATDIFF_PHI_SECRET" in lines[0] and "patients.csv names 1 patients" in lines[0]
        assert not (out / "manifest.parquet").exists()

        env["ANATDIFF_PHI_SECRET"] = SECRET
        pre = _cli(["jobs.preprocess", "--input", str(inp), "--output", str(out), "--spacing", "6", "6", "6",
                    "--set", "num_cpus=2"], env, runs)
        assert pre.returncode == 0, pre.stderr[-3000:]
        assert re.search(r"3 accepted, 1 rejected \((truncated|unreadable): 1\), 4 skipped", pre.stdout), pre.stdout
        model = ["--set", "model.channels=[8,16]", "--set", "model.time_embed_dim=16",
                 "--set", "patches.patch_size_zyx=[16,16,16]"]
        rand = _cli(["jobs.pretrain", "--data", str(out), "--run-name", "phi-rand", "--set", "objective=none",
                     "--set", "registered_model=null", "--set", f"storage_path={tmp_path / 'runs'}", *model],
                    env, runs)
        assert rand.returncode == 0, rand.stderr[-3000:]
        run_id = re.search(r"pretrain run (\w+) finished", rand.stdout).group(1)
        ev = _cli(["jobs.evaluate", "--data", str(out), "--pretrain-run-id", run_id, "--set", "head.steps=3",
                   "--set", "head.windows_per_volume=2", "--set", "ceiling=null", "--set", "compare_random_init=false",
                   "--set", "overlays=1", "--set", "num_cpus=2"], env, runs)
        assert ev.returncode == 0, ev.stderr[-3000:]

        private = out / "private"
        assert NIFTI_CASE in (private / "sources.csv").read_text()     # the mapping is there, and only there
        files = [p for root in (out, ml, Path(ray_tmp)) for p in root.rglob("*")
                 if p.is_file() and not p.is_symlink() and private not in p.parents]
        assert any(p.suffix == ".png" for p in files if ml in p.parents)  # artifacts were written
        assert any("logs" in p.parts for p in files)                      # Ray wrote its logs
        blobs = {str(p): p.read_bytes() for p in files}
        for i, run in enumerate(runs):
            blobs[f"stdout of {run.args[2]} #{i}"] = run.stdout.encode()
            blobs[f"stderr of {run.args[2]} #{i}"] = run.stderr.encode()
        assert not _hits(blobs), _hits(blobs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
