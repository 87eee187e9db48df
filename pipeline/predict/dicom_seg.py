"""DICOM SEG of a prediction on a DICOM series (highdicom), for PACS and DICOM viewers.

A SEG references its source series: highdicom copies the patient and study modules of the source slices into
it, so the file carries the same patient identifiers as the scan (it is patient data, like the scan, and is
written only when asked for: ``PredictConfig.dicom_seg``). Nothing it reads is logged or kept elsewhere.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np

from pipeline.io.atomic import write_atomic
from pipeline.labels import ORGANS

#: SNOMED CT concept (pydicom's ``codes.SCT`` name) of each organ; laterality stays in the segment label
ORGAN_CONCEPTS = {
    "spleen": "Spleen", "kidney_right": "Kidney", "kidney_left": "Kidney", "gallbladder": "Gallbladder",
    "esophagus": "Esophagus", "liver": "Liver", "stomach": "Stomach", "aorta": "Aorta",
    "inferior_vena_cava": "InferiorVenaCava", "portal_splenic_vein": "PortalVein", "pancreas": "Pancreas",
    "adrenal_right": "AdrenalGland", "adrenal_left": "AdrenalGland",
}


def write_dicom_seg(path: Path, labels_zyx: np.ndarray, slice_files: list[str]) -> Path | None:
    """A BINARY DICOM SEG at ``path`` (atomically) with one segment per organ present in ``labels_zyx`` (Z, Y, X)
    uint8 BTCV labels, whose slice k lies on ``slice_files[k]`` (the series' slices in reading order, as
    SimpleITK read them). None (nothing written) when no organ was found: a SEG needs a segment."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    present = [k for k in range(1, len(ORGANS) + 1) if np.any(labels_zyx == k)]
    if not present:
        return None
    if len(slice_files) != labels_zyx.shape[0]:
        raise ValueError(f"{labels_zyx.shape[0]} label slices for {len(slice_files)} DICOM slices")
    segment_of = np.zeros(len(ORGANS) + 1, dtype=np.uint8)
    segment_of[present] = np.arange(1, len(present) + 1)
    software = version("anatdiff")
    algorithm = hd.AlgorithmIdentificationSequence(name="anatdiff", version=software,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=ORGANS[k - 1], segmented_property_category=codes.SCT.Organ,
        segmented_property_type=getattr(codes.SCT, ORGAN_CONCEPTS[ORGANS[k - 1]]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for n, k in enumerate(present, start=1)]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(f) for f in slice_files], pixel_array=segment_of[labels_zyx],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="anatdiff", manufacturer_model_name="anatdiff predict", software_versions=software,
        device_serial_number="none", series_description="anatdiff predict (research use, not for diagnosis)")
    return write_atomic(path, lambda tmp: seg.save_as(tmp))
