"""Grad-CAM explanations of one image, from the model's `feature_maps` and `cam_weights` outputs.

The core of `/explain`, without HTTP: which outputs the model must have, the ORT run that
fetches them, the map for the asked (or predicted) class, and the PNG overlay on the uploaded
image. The prediction itself (probabilities, decision) comes from the shared runtime like any
other: this module only adds the map. ONNX Runtime only: serving never imports TensorFlow.
"""

from __future__ import annotations

import base64
import io
import warnings
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from service.errors import ExplainUnavailable, InvalidImage, UnknownClass
from service.model.manifest import Manifest
from service.model.preprocess import ALLOWED_FORMATS, _to_rgb
from service.pathology.gradcam import class_activation, normalised, upsampled
from service.pathology.overlay import heatmap_overlay, png_bytes

# Output names fixed by the model contract (MODEL_CONTRACT.md); a manifest may map them.
FEATURE_MAPS: Final = "feature_maps"
CAM_WEIGHTS: Final = "cam_weights"
# The overlay is drawn on the uploaded image, its longer side at most this: twice the page's
# thumbnail (sharp on HiDPI screens), and each pixel costs blending and PNG time.
OVERLAY_MAX_SIDE: Final = 384


class _OutputRunner(Protocol):
    """The part of `service.core.engine.Engine` an explanation needs."""

    @property
    def manifest(self) -> Manifest: ...
    @property
    def output_names(self) -> list[str]: ...
    def run_outputs(self, batch: NDArray[np.uint8], names: list[str]) -> list[NDArray[np.float32]]: ...


def cam_output_names(manifest: Manifest, graph_outputs: list[str]) -> tuple[str, str] | None:
    """The graph's (feature_maps, cam_weights) output names, or None when the model lacks them."""
    declared = (manifest.model_extra or {}).get("outputs")
    mapping = declared if isinstance(declared, dict) else {}
    names = (str(mapping.get(FEATURE_MAPS, FEATURE_MAPS)), str(mapping.get(CAM_WEIGHTS, CAM_WEIGHTS)))
    return names if all(n in graph_outputs for n in names) else None


def require_cam_outputs(manifest: Manifest, graph_outputs: list[str]) -> tuple[str, str]:
    """`cam_output_names`, or the 409 that says the model cannot be explained."""
    names = cam_output_names(manifest, graph_outputs)
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


def grad_cam(engine: _OutputRunner, image: NDArray[np.uint8], class_index: int) -> NDArray[np.float32]:
    """The (h, w) Grad-CAM map of `class_index` for the model input `image` (S, S, 3): one ORT
    run fetching only the two Grad-CAM outputs. Blocking (call it in a pool thread)."""
    names = require_cam_outputs(engine.manifest, engine.output_names)
    fmaps, weights = engine.run_outputs(image[None], list(names))
    return class_activation(fmaps[0], weights[0], class_index)


def display_image(data: bytes, max_side: int = OVERLAY_MAX_SIDE) -> NDArray[np.uint8]:
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
                rgb = _to_rgb(ImageOps.exif_transpose(img))
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


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
