"""Writers for phantoms: NIfTI (`.nii.gz`), DICOM CT series (one file per slice) and nnU-Net v2 / MSD `dataset.json`.

Geometry is canonical LPS: identity direction, origin = world position of voxel (0, 0, 0), z superior.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.labels import ORGANS

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _image(volume_zyx: np.ndarray, spacing_zyx_mm, origin_xyz_mm) -> sitk.Image:
    img = sitk.GetImageFromArray(volume_zyx)
    img.SetSpacing([float(s) for s in spacing_zyx_mm[::-1]])
    img.SetOrigin([float(o) for o in origin_xyz_mm])
    return img


def write_nifti(path: str | Path, volume_zyx: np.ndarray, spacing_zyx_mm, origin_xyz_mm) -> Path:
    """Write a (z, y, x) array (int16 HU or uint8 labels) as compressed NIfTI with identity LPS direction."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(volume_zyx, spacing_zyx_mm, origin_xyz_mm), str(path), useCompression=True,
                    compressionLevel=1)
    return path


def dicom_uid(*parts: object) -> str:
    """Deterministic DICOM UID ``2.25.<int>`` (<= 44 chars, digits and dots) from a hash of ``parts``."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def series_tags(meta: dict) -> dict[str, str]:
    """Series-level DICOM tags (``gggg|eeee`` -> value) from a phantom's meta."""
    sc, case = meta["scanner"], meta["case_id"]
    sz, sy, sx = meta["geometry"]["spacing_zyx_mm"]
    tags = {
        "0008|0060": "CT", "0008|0016": CT_IMAGE_STORAGE, "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0020": "20240101", "0008|0030": "120000", "0008|0021": "20240101", "0008|0031": "120000",
        "0008|0070": sc["manufacturer"], "0008|1090": sc["model"], "0018|1210": sc["kernel"],
        "0018|0060": str(sc["kvp"]), "0018|0050": f"{sz:g}", "0028|0030": f"{sy:g}\\{sx:g}",
        "0020|0037": "1\\0\\0\\0\\1\\0", "0018|5100": "HFS",
        "0028|1052": "0", "0028|1053": "1", "0028|1050": "40", "0028|1051": "400",
        "0010|0010": f"PHANTOM^{case}", "0010|0020": f"PH-{meta['seed']}-{meta['index']}",
        "0012|0062": "YES", "0012|0063": "synthetic phantom, no patient",  # PatientIdentityRemoved: no secret needed
        "0008|103e": f"phantom {meta['fov']['name']} {sc['kernel']}", "0020|0011": "1",
        "0020|000d": dicom_uid(case, "study"), "0020|000e": dicom_uid(case, "series"),
        "0020|0052": dicom_uid(case, "frame"),
    }
    if meta["contrast_phase"] != "none":
        tags["0018|0010"] = "IODINATED CONTRAST"
    return tags


def write_dicom_series(folder: str | Path, volume_zyx: np.ndarray, meta: dict) -> Path:
    """Write an int16 (z, y, x) HU volume as a CT series, one file ``IMG<k>.dcm`` per slice (k from inferior).

    Geometry comes from ``meta["geometry"]`` (spacing, origin); tags from :func:`series_tags`, plus per slice
    ImagePositionPatient, SliceLocation, InstanceNumber and a SOPInstanceUID.
    """
    if volume_zyx.dtype != np.int16:
        raise ValueError(f"DICOM volume must be int16 HU, got dtype {volume_zyx.dtype}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    geo = meta["geometry"]
    spacing, origin = geo["spacing_zyx_mm"], geo["origin_xyz_mm"]
    tags = series_tags(meta)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume_zyx.shape[0]):
        z = origin[2] + k * spacing[0]
        img = _image(volume_zyx[k:k + 1], spacing, (origin[0], origin[1], z))
        for key, value in tags.items():
            img.SetMetaData(key, value)
        img.SetMetaData("0020|0032", f"{origin[0]:g}\\{origin[1]:g}\\{z:g}")
        img.SetMetaData("0020|1041", f"{z:g}")
        img.SetMetaData("0020|0013", str(k + 1))
        img.SetMetaData("0008|0018", dicom_uid(meta["case_id"], "slice", k))
        writer.SetFileName(str(folder / f"IMG{k:04d}.dcm"))
        writer.Execute(img)
    return folder


def write_dataset_json(out: str | Path, cases: list[dict], image_ending: str) -> Path:
    """nnU-Net v2 + MSD ``dataset.json`` pairing ``imagesTr/<case><image_ending>`` with ``labelsTr/<case>.nii.gz``.

    Args:
        cases: records with "case_id" (sorted output order is the given order).
        image_ending: "_0000.nii.gz" for NIfTI images, "" for DICOM folders.
    """
    out = Path(out)
    doc = {
        "name": "anatdiff-phantom", "description": "synthetic CT phantoms (anatdiff pipeline.synth)",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(ORGANS)}},
        "numTraining": len(cases), "numTest": 0, "file_ending": ".nii.gz",
        "training": [{"image": f"./imagesTr/{c['case_id']}{image_ending}",
                      "label": f"./labelsTr/{c['case_id']}.nii.gz"} for c in cases],
        "test": [],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
