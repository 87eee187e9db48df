"""Test helpers of `anatdiff predict`: an oracle segmenter built from preprocess's own outputs, and phantoms
written with a non-identity direction matrix and anisotropic spacing.

The oracle is a module-level loader (``load_oracle``) so that Ray actors can import it. It answers only for
volumes that ``anatdiff preprocess`` wrote, returning the one-hot of the label preprocess put on that grid
(nearest neighbour in physical space from the original label file): predict must hand the model what
preprocess writes. "What preprocess writes" holds up to float rounding: the resampling's float32 matrix
products round differently with one BLAS thread (a Ray worker) than with several (a test process), moving
about 0.2 % of the voxels by 1 HU; the oracle accepts a volume of the same shape within 1 HU on under 1 % of
its voxels, and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.config import PreprocessConfig
from pipeline.ingest.preprocess import preprocess_unit
from pipeline.io.layouts import discover_items
from pipeline.labels import ORGANS
from pipeline.synth.phantom import make_phantom

NUM_CLASSES = len(ORGANS) + 1


def find_volume(volumes: dict[str, np.ndarray], volume_hu_zyx: np.ndarray) -> str | None:
    """The key of the stored volume equal to ``volume_hu_zyx`` up to rounding (same shape, at most 1 HU apart,
    on under 1 % of the voxels), or None."""
    for key, stored in volumes.items():
        if stored.shape == volume_hu_zyx.shape:
            diff = np.abs(stored.astype(np.int32) - volume_hu_zyx)
            if diff.max() <= 1 and np.count_nonzero(diff) < 0.01 * diff.size:
                return key
    return None


class OracleSegmenter:
    """Knows the label of every volume it was built for; anything else is a test failure."""

    label_names = ORGANS

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        meta = json.loads((folder / "oracle.json").read_text())
        self.spacing_zyx_mm = tuple(meta["spacing_zyx_mm"])
        self.body_threshold_hu = float(meta["body_threshold_hu"])
        self.mode = meta.get("mode", "oracle")
        self.island_fraction = meta.get("island_fraction", 0.0)
        self.labels = dict(np.load(folder / "labels.npz"))
        self.volumes = dict(np.load(folder / "volumes.npz"))
        self.calls = 0

    def predict_probs(self, volume_hu_zyx: np.ndarray, mask_zyx: np.ndarray) -> np.ndarray:
        assert volume_hu_zyx.dtype == np.int16 and mask_zyx.dtype == bool
        assert volume_hu_zyx.shape == mask_zyx.shape and mask_zyx.any()
        self.calls += 1
        if self.mode == "wrong-shape":
            return np.zeros((3, *volume_hu_zyx.shape), np.float32)
        if self.mode == "bone-as-liver":           # any scan: voxels above 150 HU in the body get label 6
            label = np.where((volume_hu_zyx > 150) & mask_zyx, 6, 0)
            return np.eye(NUM_CLASSES, dtype=np.float32)[label].transpose(3, 0, 1, 2).copy()
        key = find_volume(self.volumes, volume_hu_zyx)
        if key is None:
            raise AssertionError("predict fed the model a volume that preprocess did not write")
        return np.eye(NUM_CLASSES, dtype=np.float32)[self.labels[key]].transpose(3, 0, 1, 2).copy()


def load_oracle(folder: str) -> OracleSegmenter:
    return OracleSegmenter(folder)


def write_oracle(labelled_root: Path, folder: Path, spacing_zyx_mm=(3.0, 3.0, 3.0), body_threshold_hu=-500.0,
                 mode: str = "oracle") -> Path:
    """Preprocess every labelled item under ``labelled_root`` (into ``folder/pre``) and keep, per volume, the
    label preprocess put on its grid: the oracle's model folder."""
    cfg = PreprocessConfig(input=str(labelled_root), output=str(folder / "pre"), target_spacing_zyx_mm=spacing_zyx_mm,
                           body_threshold_hu=body_threshold_hu, log_to_mlflow=False)
    labels, volumes = {}, {}
    items, _ = discover_items(labelled_root)
    for item in items:
        for row in preprocess_unit(item, cfg, folder / "pre"):
            if row["status"] == "accepted" and row["label_path"]:
                volumes[row["item_id"]] = np.load(folder / "pre" / row["image_path"])
                labels[row["item_id"]] = np.load(folder / "pre" / row["label_path"])
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "labels.npz", **labels)
    np.savez_compressed(folder / "volumes.npz", **volumes)
    (folder / "oracle.json").write_text(json.dumps({"spacing_zyx_mm": list(spacing_zyx_mm),
                                                    "body_threshold_hu": body_threshold_hu, "mode": mode}))
    shutil.rmtree(folder / "pre")
    return folder


def rotation(axis_xyz, angle_deg: float) -> np.ndarray:
    """(3, 3) rotation about a unit axis (Rodrigues)."""
    k = np.asarray(axis_xyz, float) / np.linalg.norm(axis_xyz)
    a = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


#: the test direction: y flipped (the array's rows run anterior), then tilted 20 degrees about a skew axis
OBLIQUE_FLIPPED = rotation((0.3, 0.2, 1.0), 20.0) @ np.diag([1.0, -1.0, 1.0])


def phantom_on_grid(seed: int, spacing_xyz_mm=(3.0, 3.5, 4.5), direction=OBLIQUE_FLIPPED,
                    phantom_spacing_mm: float = 4.0) -> tuple[sitk.Image, sitk.Image]:
    """An upper-abdomen phantom (image int16 HU, label uint8) resampled in physical space onto a grid with
    ``direction`` (columns: LPS unit vectors of the x, y, z index axes) and ``spacing_xyz_mm``, covering it."""
    ph = make_phantom(seed, 0, spacing_mm=phantom_spacing_mm, fov="upper_abdomen")
    image, label = (sitk.GetImageFromArray(a) for a in (ph.image_hu_zyx, ph.label_zyx))
    for img in (image, label):
        img.SetSpacing([float(s) for s in ph.spacing_zyx_mm[::-1]])
        img.SetOrigin([float(o) for o in ph.origin_xyz_mm])
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    d = np.asarray(direction, float).reshape(3, 3)
    spacing = np.asarray(spacing_xyz_mm, float)
    size = np.ceil(np.abs(d.T) @ extent / spacing * 0.9).astype(int)   # most of the phantom, rotated
    ref = sitk.Image([int(s) for s in size], sitk.sitkInt16)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetDirection([float(v) for v in d.ravel()])
    ref.SetOrigin([float(v) for v in centre - d @ ((size - 1) / 2 * spacing)])
    out_image = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    out_label = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return out_image, out_label


def write_btcv(root: Path, cases: list[tuple[sitk.Image, sitk.Image]]) -> Path:
    """``root/img/imgNNNN.nii.gz`` + ``root/label/labelNNNN.nii.gz`` (the BTCV layout), numbered from 1."""
    for n, (image, label) in enumerate(cases, start=1):
        for folder, name, img in (("img", "img", image), ("label", "label", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / folder / f"{name}{n:04d}.nii.gz"), useCompression=True)
    return root


def write_dicom_series(folder: Path, image: sitk.Image, uid: str = "1.2.826.0.1.3680043.2.1125.77") -> Path:
    """An int16 3-D image as a CT series, one file per slice, with its direction (ImageOrientationPatient from
    the x and y columns; the slice normal must be their cross product, as DICOM requires) and origin."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    assert np.allclose(np.cross(d[:, 0], d[:, 1]), d[:, 2]), "DICOM slices stack along row x column"
    sx, sy, sz = image.GetSpacing()
    array = sitk.GetArrayFromImage(image)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[k])
        sl.SetSpacing((sx, sy))
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0020|000e": uid, "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])),
                "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0013": str(k + 1),
                "0028|0030": f"{sy:g}\\{sx:g}", "0018|0050": f"{sz:g}", "0010|0020": "PRED-TEST-1",
                "0020|000d": uid + ".1", "0020|0052": uid + ".2", "0008|0018": f"{uid}.3.{k + 1}",
                "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)
    return folder
