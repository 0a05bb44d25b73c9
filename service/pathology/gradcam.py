"""Grad-CAM from the model's own outputs, with no autodiff at serving time.

The contract's `feature_maps` (h, w, K) and `cam_weights` (K, C) = d logit_c / d GAP_k give
cam_c = ReLU(sum_k cam_weights[k, c] * feature_maps[:, :, k]): Selvaraju et al.'s Grad-CAM up to
a positive constant, which normalising to the peak removes (docs/model_contract.md).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from service.errors import ExplainUnavailable, InvalidImage, UnknownClass
from service.model.manifest import CAM_WEIGHTS, FEATURE_MAPS, Manifest
from service.model.preprocess import ALLOWED_FORMATS, to_rgb
from service.pathology.overlay import heatmap_overlay, png_bytes

FloatMap = NDArray[np.float32]

# The /explain overlay's longer side: twice the page's thumbnail (sharp on HiDPI screens); each
# pixel costs blending and PNG time.
EXPLAIN_OVERLAY_MAX_SIDE: Final = 384


class OutputRunner(Protocol):
    """What Grad-CAM needs of a model (a `service.core.model_client.ModelClient` has it)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def output_names(self) -> list[str]: ...

    async def run_outputs(self, batch: NDArray[np.uint8], names: Sequence[str]) -> list[NDArray[np.float32]]: ...


def require_cam_outputs(manifest: Manifest, graph_outputs: list[str]) -> tuple[str, str]:
    """The graph's Grad-CAM outputs, or the 409 that says the model cannot be explained."""
    names = manifest.cam_outputs(graph_outputs)
    if names is None:
        raise ExplainUnavailable(
            f"model {manifest.name} {manifest.version} has no Grad-CAM outputs ({FEATURE_MAPS}, {CAM_WEIGHTS}); "
            "serve a model exported with them (model contract v2) to use /explain"
        )
    return names


def check_class(manifest: Manifest, requested: str | None) -> None:
    """422 for a class the model does not have (checked before any decode)."""
    if requested is not None and requested not in manifest.classes:
        raise UnknownClass(f"class {requested!r} is not one of the model's classes {manifest.classes}")


def class_index(manifest: Manifest, requested: str | None, probabilities: NDArray[np.float32]) -> int:
    """The class to explain: the one asked for, else the predicted one."""
    if requested is None:
        return int(np.argmax(probabilities))
    check_class(manifest, requested)
    return manifest.classes.index(requested)


async def grad_cam(model: OutputRunner, image: NDArray[np.uint8], class_index: int) -> FloatMap:
    """The (h, w) Grad-CAM map of `class_index` for the model input `image` (S, S, 3): one model
    run fetching only the two Grad-CAM outputs."""
    names = require_cam_outputs(model.manifest, model.output_names)
    fmaps, weights = await model.run_outputs(image[None], names)
    return class_activation(fmaps[0], weights[0], class_index)


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


def display_image(data: bytes, max_side: int = EXPLAIN_OVERLAY_MAX_SIDE) -> NDArray[np.uint8]:
    """The uploaded image, upright and RGB, its longer side at most `max_side` (for the overlay).

    Called after `load_image` accepted the same bytes, so size limits are already checked.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (max_side, max_side))
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
                # reducing_gap: a fast integer pre-reduction, then the filter (a display image).
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"image data is corrupt or truncated: {exc}") from exc


def overlay_png(display: NDArray[np.uint8], cam: NDArray[np.float32]) -> bytes:
    """The normalised map, upsampled over the whole image (the model saw it squashed to a square)."""
    height, width = display.shape[:2]
    heat = upsampled(normalised(cam), width, height)
    return png_bytes(Image.fromarray(heatmap_overlay(display, heat)))
