"""The 13 BTCV organs: label indices and metric names shared by every stage."""

from __future__ import annotations

#: Organ names in BTCV label order; label value = position + 1 (0 is background).
ORGANS: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_splenic_vein",
    "pancreas",
    "adrenal_right",
    "adrenal_left",
)

NUM_ORGANS = len(ORGANS)

#: label value -> organ name
LABEL_TO_ORGAN: dict[int, str] = {i + 1: name for i, name in enumerate(ORGANS)}
ORGAN_TO_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(ORGANS)}
