"""Grad-CAM from the model's own outputs, with no autodiff at serving time.

The model v2 graph exports, beside `probabilities`, the last conv block's activations
`feature_maps` (h, w, K) and `cam_weights` (K, C) = d logit_c / d GAP_k at this input, computed
in closed form through the dense head. Grad-CAM's channel weights are the spatial mean of
d logit_c / d A_k; through the final MaxPool and the GAP they equal `cam_weights` up to a
positive constant, so

    cam_c = ReLU(sum_k cam_weights[k, c] * feature_maps[:, :, k])

is Selvaraju et al.'s Grad-CAM up to that constant (the contract in MODEL_CONTRACT.md). The
maps are reported raw and normalised to [0, 1] by their maximum, which removes the constant.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from PIL import Image

FloatMap = NDArray[np.float32]


def class_activation(
    feature_maps: NDArray[np.floating], cam_weights: NDArray[np.floating], class_index: int
) -> FloatMap:
    """ReLU(feature_maps . cam_weights[:, c]): the (h, w) Grad-CAM map of class `class_index`."""
    if feature_maps.ndim != 3 or cam_weights.ndim != 2 or feature_maps.shape[2] != cam_weights.shape[0]:
        raise ValueError(
            f"feature_maps (h, w, K) and cam_weights (K, C) do not fit: {feature_maps.shape}, {cam_weights.shape}"
        )
    if not 0 <= class_index < cam_weights.shape[1]:
        raise ValueError(f"class index {class_index} is outside 0..{cam_weights.shape[1] - 1}")
    weighted = np.tensordot(feature_maps.astype(np.float64), cam_weights[:, class_index].astype(np.float64), axes=1)
    return np.maximum(weighted, 0.0).astype(np.float32)


def normalised(cam: NDArray[np.floating]) -> FloatMap:
    """`cam` / its maximum, in [0, 1]; an all-zero map (no positive evidence) stays zero."""
    peak = float(np.max(cam)) if cam.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(cam.shape, dtype=np.float32)
    out: FloatMap = np.clip(cam / peak, 0.0, 1.0).astype(np.float32)
    return out


def upsampled(cam: NDArray[np.floating], width: int, height: int) -> FloatMap:
    """Bilinear upsampling of an (h, w) map to (height, width), as Grad-CAM overlays are drawn."""
    image = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
