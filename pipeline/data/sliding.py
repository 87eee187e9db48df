"""Sliding-window prediction over a whole volume (wraps ``monai.inferers.sliding_window_inference``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

BLEND_MODES = {"gaussian": "gaussian", "uniform": "constant"}


def sliding_window_predict(volume: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
                           window_zyx: Sequence[int], overlap: float = 0.5, batch_size: int = 1,
                           blend: str = "gaussian", pad_value: float = 0.0) -> torch.Tensor:
    """Run ``predictor`` on overlapping windows of ``volume`` and blend the outputs into one volume.

    volume: (1, C, D, H, W) float tensor (e.g. HU scaled to [0, 1], plus any coordinate channels).
    predictor: (b, C, d, h, w) patch batch -> (b, K, d, h, w) tensor (logits or probabilities; blend
        probabilities if they will be thresholded). b <= batch_size windows per call.
    window_zyx: (d, h, w) window size in voxels. A volume smaller than the window along an axis is padded
        with ``pad_value`` and the padding cropped away; sizes need not be multiples of the window.
    overlap: fraction in [0, 1) that consecutive windows share along each axis.
    blend: "gaussian" (centre-weighted, sigma = window / 8) or "uniform" (plain average).
    Returns (1, K, D, H, W) tensor on ``volume``'s device, computed without gradients.
    """
    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ValueError(f"volume must be a (1, C, D, H, W) tensor, got shape {tuple(volume.shape)}")
    window = tuple(int(w) for w in window_zyx)
    if len(window) != 3 or any(w < 1 for w in window):
        raise ValueError(f"window_zyx must be 3 positive ints (d, h, w), got {tuple(window_zyx)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {sorted(BLEND_MODES)}, got {blend!r}")
    with torch.no_grad():
        out = sliding_window_inference(volume, window, batch_size, predictor, overlap=overlap,
                                       mode=BLEND_MODES[blend], padding_mode="constant", cval=pad_value)
    return torch.as_tensor(out)
