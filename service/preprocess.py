"""Image bytes -> uint8 RGB array of the model's input size.

This is the *only* decode/resize path: training (`export.data`) caches its arrays
through `load_image`, and the service calls the same function per request, so there
is no train/serve skew. `RESIZE` describes it and is written into the model manifest.
Pure functions, no I/O beyond the bytes given: safe to run in a thread pool.
"""

from __future__ import annotations

import io
import warnings
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage

# Recorded in model.json; the engine refuses a manifest that names another resize.
RESIZE: Final[dict[str, str]] = {
    "library": "Pillow",
    "filter": "bilinear",
    "antialias": "true",
    "geometry": "squash to square",
    "jpeg_draft": "DCT downscale to >= input size when the source is >= 2x larger",
}
_FILTER: Final = Image.Resampling.BILINEAR

# Histology slides have a white background, so transparency is flattened onto white.
_BACKGROUND: Final = (255, 255, 255)

# A truncated upload must be an error, never a half-grey image classified as tissue.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(data: bytes, size: int, *, max_pixels: int = 50_000_000, draft: bool = True) -> NDArray[np.uint8]:
    """Decode `data` and return a C-contiguous (size, size, 3) uint8 RGB array.

    Raises InvalidImage for anything that is not a complete, decodable image and
    ImageTooLarge when the declared pixel count exceeds `max_pixels` (checked from the
    header, before the pixels are decoded).
    """
    if not data:
        raise InvalidImage("the file is empty")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the policy; Pillow's global bomb
            # warning would otherwise escape as a warning (an error under pytest).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage("not a decodable image (expected JPEG, PNG, TIFF or BMP)") from exc
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InvalidImage("image has no pixels")
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        try:
            if draft and img.format == "JPEG" and min(width, height) >= 2 * size:
                # DCT-domain downscaling (1/2, 1/4, 1/8) to the smallest scale still >= size:
                # several times cheaper than a full decode of a 768 px original.
                img.draft("RGB", (size, size))
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
            resized = rgb.resize((size, size), _FILTER)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidImage(f"image data is corrupt or truncated: {exc}") from exc
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, keeping the visual meaning (not Pillow's clipping)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale (e.g. some TIFF scanners): Pillow's convert would clip at
        # 255; scale by the type's range instead.
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
