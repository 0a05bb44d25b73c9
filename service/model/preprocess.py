"""Image bytes -> uint8 RGB array of the model's input size.

This is the *only* decode/resize path: training (`export.data`) caches its arrays
through `load_image`, and the service calls the same function per request, so there
is no train/serve skew. `RESIZE` describes it and is written into the model manifest.
Pure functions, no I/O beyond the bytes given: safe to run in a thread pool.

Two decoders, one result. Pillow opens every file (format allow-list, size limits, header; the
JPEG marker walk follows) and decodes everything but the common JPEG: baseline, one scan, three
colour components, no EXIF rotation, a decode below the large-image lane (every real tile and
original). That one is decoded by libjpeg-turbo through simplejpeg: 3-6 % less CPU per
load_image, as the header checks and the resize, unchanged, are most of its cost
(docs/benchmarks/PROFILE.md). The same library as Pillow's, the same DCT scale as its draft, the
same islow IDCT and fancy upsampling: the pixels are identical (tests/unit/test_fast_jpeg.py
compares every real image). Any libjpeg error or warning sends the file to Pillow's path, so
every refusal, and its message, is Pillow's.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import simplejpeg  # type: ignore[import-untyped]  # no stubs; two calls
from numpy.typing import NDArray
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage
from service.model.jpeg import Data, JpegLayout, read_layout

# Recorded in model.json; the engine refuses a manifest that names another resize.
RESIZE: Final[dict[str, str]] = {
    "library": "Pillow",
    "filter": "bilinear",
    "antialias": "true",
    "geometry": "squash to square",
    "jpeg_draft": "DCT downscale to >= input size when the source is >= 2x larger",
}
RESIZE_FILTER: Final = Image.Resampling.BILINEAR

# Histology slides have a white background, so transparency is flattened onto white.
_BACKGROUND: Final = (255, 255, 255)

# A truncated upload must be an error, never a half-grey image classified as tissue.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Exactly the documented formats, handed to `Image.open(formats=...)`: Pillow then never runs
# another plugin's parser on an upload (GIF, WebP, ICO, PCX, PPM ... and EPS, whose loader
# would start Ghostscript). MPO is how Pillow names a JPEG carrying a second (preview) picture.
ALLOWED_FORMATS: Final = ("JPEG", "PNG", "TIFF", "BMP")
_ACCEPTED: Final = frozenset((*ALLOWED_FORMATS, "MPO"))
_JPEG_FAMILY: Final = frozenset(("JPEG", "MPO"))
NOT_AN_IMAGE: Final = "not a decodable image (expected JPEG, PNG, TIFF or BMP)"

# libjpeg meets an end-of-image marker before the last scan line (a truncated file with EOI
# appended, or a header edited to claim more lines) with a warning only, and fills the missing
# blocks with zero coefficients: mid-grey 128 in every channel. Pillow does not surface that
# warning, so the fill itself is the evidence: a decoded JPEG whose last pixel row is exactly
# this grey is refused. (A JPEG that is a uniform 128 grey everywhere is refused too: it is no
# tissue image either.)
_JPEG_FILL: Final = 128
_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")

# The default of LUNGSERVE_LARGE_IMAGE_PIXELS (service.settings): from this decode cost an image
# takes the large-image lane, and Pillow's path, whose reader stops a decode nobody waits for.
LARGE_DECODE_PIXELS: Final = 4_000_000
_ORIENTATION: Final = 0x0112  # EXIF Orientation, the tag ImageOps.exif_transpose reads

DecoderName = Literal["simplejpeg", "pillow"]


@dataclass(frozen=True)
class Probe:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    # Pixels the decoder will produce: fewer than width x height when a JPEG is decoded
    # DCT-reduced (draft), the same otherwise (PNG, TIFF and BMP have no reduced decode).
    decode_pixels: int


@dataclass(frozen=True, eq=False)
class Decoded:
    """`load_image`'s array, and which decoder produced it (tests and benchmarks ask)."""

    pixels: NDArray[np.uint8]
    decoder: DecoderName


class DecodeAbandoned(Exception):
    """The request that wanted this decode was answered (deadline, client gone): stop."""


class _Abandonable(io.BytesIO):
    """The bytes Pillow decodes from, read in blocks (ImageFile.MAXBLOCK): between two blocks a
    decode whose request is gone stops, instead of burning its CPU for nobody."""

    def __init__(self, data: bytes, cancelled: threading.Event | None) -> None:
        super().__init__(data)
        self._cancelled = cancelled

    def read(self, size: int | None = -1, /) -> bytes:
        if self._cancelled is not None and self._cancelled.is_set():
            raise DecodeAbandoned
        return super().read(size)


def _open(data: bytes, max_pixels: int, cancelled: threading.Event | None = None) -> Image.Image:
    if not data:
        raise InvalidImage("the file is empty")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check is the policy; Pillow's global bomb warning would
            # otherwise escape as a warning (an error under pytest).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(_Abandonable(data, cancelled), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses far beyond our limit by itself (2 x its MAX_IMAGE_PIXELS); quote ours.
        found = _BOMB_SIZE.search(str(exc))
        size = f"{found.group(1)} pixels" if found else "more pixels than Pillow will open"
        raise ImageTooLarge(f"image is {size}; the limit is LUNGSERVE_MAX_IMAGE_PIXELS = {max_pixels}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as exc:
        raise InvalidImage(NOT_AN_IMAGE) from exc
    if img.format not in _ACCEPTED:  # defence in depth: a plugin registered under another name
        img.close()
        raise InvalidImage(NOT_AN_IMAGE)
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise InvalidImage("image has no pixels")
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is LUNGSERVE_MAX_IMAGE_PIXELS = {max_pixels}"
        )
    return img


def _draft_scale(img: Image.Image, size: int, draft: bool) -> int:
    """The DCT reduction (1, 2, 4 or 8) Pillow's draft mode will use for this JPEG."""
    if not draft or img.format not in _JPEG_FAMILY:
        return 1
    width, height = img.size
    if min(width, height) < 2 * size:
        return 1
    scale = 1
    while scale < 8 and min(width, height) // (scale * 2) >= size:
        scale *= 2
    return scale


def jpeg_layout(img: Image.Image, data: Data) -> JpegLayout | None:
    """A JPEG's scans from its markers (service.model.jpeg): a scan bomb is refused (413) and a
    progressive file cut at a scan boundary is invalid (422), before any pixel is decoded."""
    if img.format not in _JPEG_FAMILY:
        return None
    return read_layout(data)


def probe_image(data: bytes, size: int, *, max_pixels: int = 50_000_000, draft: bool = True) -> Probe:
    """Read the header only: format, size and decode cost; the same refusals as `load_image`."""
    with _open(data, max_pixels) as img:
        layout = jpeg_layout(img, data)
        # A multi-scan JPEG keeps every DCT coefficient of the full image until its last scan,
        # whatever the draft scale: its memory and CPU are those of the full size.
        scale = _draft_scale(img, size, draft) if layout is None or layout.single_scan else 1
        width, height = img.size
        fmt = str(img.format)
    return Probe(fmt, width, height, _decode_pixels(width, height, scale))


def _decode_pixels(width: int, height: int, scale: int) -> int:
    """Pixels of a decode at 1/scale: libjpeg rounds each side up."""
    return -(-width // scale) * -(-height // scale)


def load_image(
    data: bytes,
    size: int,
    *,
    max_pixels: int = 50_000_000,
    draft: bool = True,
    cancelled: threading.Event | None = None,
    large_pixels: int = LARGE_DECODE_PIXELS,
) -> NDArray[np.uint8]:
    """Decode `data` and return a C-contiguous (size, size, 3) uint8 RGB array.

    Raises InvalidImage for anything that is not a complete, decodable JPEG, PNG, TIFF or BMP
    and ImageTooLarge when the declared pixel count (or a JPEG's scan count) exceeds the limits
    (checked from the header and markers, before the pixels are decoded). Once `cancelled` is
    set the decode stops with DecodeAbandoned. A decode cost of `large_pixels` or more always
    takes Pillow's path (cancellable between blocks); `large_pixels=0` forces it for any file.
    """
    return decode_image(
        data, size, max_pixels=max_pixels, draft=draft, cancelled=cancelled, large_pixels=large_pixels
    ).pixels


def decode_image(
    data: bytes,
    size: int,
    *,
    max_pixels: int = 50_000_000,
    draft: bool = True,
    cancelled: threading.Event | None = None,
    large_pixels: int = LARGE_DECODE_PIXELS,
) -> Decoded:
    """`load_image`, saying which decoder produced the pixels."""
    with _open(data, max_pixels, cancelled) as img:
        layout = jpeg_layout(img, data)
        # DCT-domain downscaling (1/2, 1/4, 1/8) to the smallest scale still >= size: several
        # times cheaper than a full decode of a 768 px original. Both decoders use this scale.
        scale = _draft_scale(img, size, draft)
        try:
            common = _is_common_jpeg(img, layout, scale, large_pixels)
            fast = _decode_simplejpeg(data, img.size, scale) if common else None
            rgb = fast if fast is not None else _decode_pillow(img, data, layout, size, scale)
            resized = rgb.resize((size, size), RESIZE_FILTER)
        except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as exc:
            raise InvalidImage(f"image data is corrupt or truncated: {exc}") from exc
    pixels = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))
    return Decoded(pixels, "pillow" if fast is None else "simplejpeg")


def _is_common_jpeg(img: Image.Image, layout: JpegLayout | None, scale: int, large_pixels: int) -> bool:
    """A file simplejpeg decodes to Pillow's exact pixels: a plain JPEG (not MPO), one baseline scan
    (multi-scan files need decode_whole's strict pass), three colour components (Pillow's "RGB"),
    no EXIF rotation, and a decode small enough that it need not be cancellable."""
    if img.format != "JPEG" or img.mode != "RGB" or layout is None or not layout.single_scan:
        return False
    if _decode_pixels(*img.size, scale) >= large_pixels:
        return False
    # Read from the header Pillow already parsed (EXIF or XMP): what exif_transpose would apply.
    orientation: object = img.getexif().get(_ORIENTATION, 1)
    return orientation == 1


def _decode_simplejpeg(data: bytes, source: tuple[int, int], scale: int) -> Image.Image | None:
    """The JPEG decoded by libjpeg-turbo at 1/scale, or None: then Pillow's path decides.

    strict=True turns every libjpeg warning (a cut, a corrupt scan, stray bytes) into a
    ValueError. Such a file goes to Pillow's path, which refuses it, or accepts it, exactly as
    before, with the same messages.
    """
    width, height = -(-source[0] // scale), -(-source[1] // scale)
    try:
        # libjpeg-turbo's smallest scale (of n/8) still giving this size is 1/scale, Pillow's draft.
        pixels: NDArray[np.uint8] = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            fastdct=False,  # islow IDCT and fancy upsampling: libjpeg's defaults, as Pillow
            fastupsample=False,
            min_width=width,
            min_height=height,
            strict=True,
        )
    except ValueError:
        return None
    if pixels.shape != (height, width, 3):
        return None  # another scale than Pillow's draft: parity first
    _refuse_grey_last_row(pixels[-1])
    return Image.fromarray(pixels)


def _decode_pillow(img: Image.Image, data: bytes, layout: JpegLayout | None, size: int, scale: int) -> Image.Image:
    """Every file: Pillow's decode with the truncation checks, EXIF orientation, then RGB."""
    if scale > 1:
        img.draft("RGB", (size, size))
    decode_whole(img, data, layout)
    return to_rgb(ImageOps.exif_transpose(img))


def decode_whole(img: Image.Image, data: Data, layout: JpegLayout | None) -> None:
    """`img.load()`, then the proof that the file was whole: the one validity check of every
    decode (/predict, /analyze, training). Raises InvalidImage for a truncated or corrupt file.

    Pillow decodes a JPEG cut short and closed with EOI without an error: a baseline one with
    libjpeg's grey fill (refused from its last row), a progressive one blurred, with no trace in
    the pixels. So a multi-scan JPEG is also decoded once by libjpeg-turbo with its warnings as
    errors (simplejpeg, strict, at 1/8 scale: the cost is the entropy decoding of the scans).
    """
    img.load()
    if layout is None:
        return
    _refuse_grey_fill(img)
    if not layout.single_scan:
        try:
            # The smallest output (1/8 scale, one channel): every scan is still entropy-decoded.
            simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=1, min_height=1, strict=True)
        except ValueError as exc:
            raise InvalidImage(f"image data is truncated or corrupt: {exc}") from exc


def _refuse_grey_fill(img: Image.Image) -> None:
    if img.mode not in ("L", "RGB", "YCbCr"):
        return  # CMYK / Adobe JPEGs fill with another value; Pillow's own errors still apply
    _refuse_grey_last_row(np.asarray(img.crop((0, img.height - 1, img.width, img.height))))


def _refuse_grey_last_row(last_row: NDArray[np.uint8]) -> None:
    if bool((last_row == _JPEG_FILL).all()):
        raise InvalidImage(
            "image data is truncated or corrupt: the JPEG ends before its last scan line "
            "(the decoder filled the rest with grey)"
        )


def to_rgb(img: Image.Image) -> Image.Image:
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
