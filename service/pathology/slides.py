"""Large images read one tile at a time: plain JPEG/PNG/TIFF through Pillow, whole slides through OpenSlide.

`open_slide(path, ...)` picks the reader: OpenSlide (the `slides` extra) for pyramidal formats,
each tile read from the level closest to the model's scale; Pillow for plain images up to
`max_pixels`, a JPEG decoded at its DCT scale as training images were. Each tile leaves as the
model's (size, size, 3) uint8 input. Synchronous and blocking: call from the decode pool.
Readers and memory bounds: docs/pathology.md.
"""

from __future__ import annotations

import math
import mmap
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage
from service.model.jpeg import Data
from service.model.preprocess import ALLOWED_FORMATS, RESIZE_FILTER, decode_whole, jpeg_layout, to_rgb
from service.pathology.tiff_strips import NotStripTiff, StripTiffSlide, strip_layout
from service.pathology.tiles import Tile

# Transparent pixels (outside a slide's scanned area) become white glass, as in preprocess.
_WHITE: Final = (255, 255, 255)
_ORIENTATION: Final = 0x0112  # EXIF tag
# Side of the blocks a slide's thumbnail is read in (16 MiB of RGBA each).
_THUMBNAIL_BLOCK: Final = 2048


class Slide(Protocol):
    """A large image readable tile by tile."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def reader(self) -> str:
        """`pillow` or `openslide`."""

    def describe(self) -> dict[str, Any]:
        """Format facts for the response (reader, format, microns per pixel when known)."""

    def prepare(self) -> None:
        """Decode what must be decoded before tiles are read (a plain image: all of it)."""

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        """The tile as the model input: (size, size, 3) uint8 RGB."""

    def thumbnail(self, max_side: int) -> Image.Image:
        """The whole image, its longer side at most `max_side`, in RGB."""

    def close(self) -> None: ...


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def open_slide(path: Path, *, max_pixels: int, tile_px: int, size: int, max_tile_pixels: int = 4_000_000) -> Slide:
    """The best reader for the file at `path` (see the module docstring). `max_tile_pixels`
    bounds the tiles a slide format claims (OpenSlide reads a whole stored tile at once)."""
    if openslide_available():
        import openslide

        try:
            vendor = openslide.OpenSlide.detect_format(str(path))
        except openslide.OpenSlideError:
            vendor = None
        if vendor is not None:
            return OpenSlideSlide(path, vendor, max_tile_pixels=max_tile_pixels)
    try:
        # A stripped TIFF is read a band of strips at a time (never decoded whole) when its
        # layout allows; anything else (or anything odd) goes to Pillow, which says what is wrong.
        return StripTiffSlide(path, strip_layout(path), tile_px)
    except (NotStripTiff, InvalidImage, OSError):
        pass
    return PillowSlide(path, max_pixels=max_pixels, tile_px=tile_px, size=size)


@contextmanager
def _mapped(path: Path) -> Iterator[Data]:
    """The file's bytes without reading them into memory (the JPEG marker walk, strict decode)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


class PillowSlide:
    """A plain image: the header is read at once (size, pixel limit), the pixels on first use."""

    reader = "pillow"

    def __init__(self, path: Path, *, max_pixels: int, tile_px: int, size: int) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path, formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image has too many pixels: {exc}") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            hint = "" if openslide_available() else " (whole-slide formats need the `slides` extra: OpenSlide)"
            raise InvalidImage(f"not a decodable image (expected JPEG, PNG or TIFF){hint}") from exc
        width, height = img.size
        if width <= 0 or height <= 0:
            img.close()
            raise InvalidImage("image has no pixels")
        if width * height > max_pixels:
            img.close()
            hint = (
                "; a pyramidal (tiled) TIFF or a slide format is read tile by tile instead"
                if openslide_available()
                else "; install the `slides` extra (OpenSlide) to read pyramidal TIFF and slide formats"
            )
            raise ImageTooLarge(
                f"image is {width}x{height} = {width * height} pixels; the limit for plain images is {max_pixels}{hint}"
            )
        try:
            # The scan budget and whole scan script, as for /predict: before the large-image lane.
            with _mapped(path) as data:
                jpeg_layout(img, data)
        except BaseException:
            img.close()
            raise
        self._source = img
        self._path = path
        self._format = img.format or "unknown"
        self._tile_side = min(tile_px, width, height)
        self._size = size
        try:
            quarter_turn = img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
        except (OSError, ValueError, SyntaxError):
            quarter_turn = False
        # Tiles are given in source pixels after EXIF orientation (what a viewer shows).
        self._width, self._height = (height, width) if quarter_turn else (width, height)
        self._image: Image.Image | None = None
        self._lock = threading.Lock()

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    def describe(self) -> dict[str, Any]:
        return {"reader": self.reader, "format": self._format, "mpp": None, "levels": 1}

    def prepare(self) -> None:
        self._decoded()

    def _decoded(self) -> Image.Image:
        """Decode once (the first reader thread does it, the others wait for it)."""
        with self._lock:
            if self._image is None:
                img = self._source
                try:
                    width, height = img.size
                    if img.format == "JPEG" and self._tile_side >= 2 * self._size:
                        # The DCT scale that keeps a tile >= the model input (see load_image).
                        scale = self._size / self._tile_side
                        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
                    with _mapped(self._path) as data:
                        decode_whole(img, data, jpeg_layout(img, data))  # the same validity check as /predict
                    self._image = to_rgb(ImageOps.exif_transpose(img))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    raise InvalidImage(f"image data is corrupt or truncated: {exc}") from exc
                finally:
                    img.close()
            return self._image

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        image = self._decoded()
        sx, sy = image.width / self._width, image.height / self._height
        # Crop, then resize: the tile's own pixels only, as if it had been uploaded alone.
        box = (
            round(tile.x * sx),
            round(tile.y * sy),
            round((tile.x + tile.width) * sx),
            round((tile.y + tile.height) * sy),
        )
        with image.crop(box) as crop:
            resized = crop.resize((size, size), RESIZE_FILTER)
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))

    def thumbnail(self, max_side: int) -> Image.Image:
        decoded = self._decoded()
        if self._format == "JPEG" and max(decoded.size) < min(max_side, max(self._width, self._height)):
            # The tiles' DCT scale is too coarse for a sharp picture: decode again at the
            # scale of the thumbnail (a JPEG decodes at 1/2, 1/4, 1/8 for a fraction of the cost).
            decoded = self._redecoded(max_side)
        thumb = decoded.copy()
        thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return thumb

    def _redecoded(self, max_side: int) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self._path, formats=ALLOWED_FORMATS) as img:
                    scale = max_side / max(img.size)
                    img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
                    img.load()
                    return to_rgb(ImageOps.exif_transpose(img))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidImage(f"image data is corrupt or truncated: {exc}") from exc

    def close(self) -> None:
        self._source.close()
        if self._image is not None:
            self._image.close()


class SlideClosed(RuntimeError):
    """A read of a slide after its close (only a read nobody waits for any more can see it)."""


class OpenSlideSlide:
    reader = "openslide"

    def __init__(self, path: Path, vendor: str, *, max_tile_pixels: int) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise InvalidImage(f"OpenSlide cannot read this {vendor} file: {exc}") from exc
        # OpenSlide aborts the whole process when a slide is closed under a read on another
        # thread (an assertion in its TIFF handle cache). A request that fails or is cancelled
        # closes its slide while pool threads may still read it: the close waits for the last.
        self._use = threading.Lock()
        self._readers = 0
        self._closing = False
        self._vendor = vendor
        self._width, self._height = self._slide.dimensions
        if self._width <= 0 or self._height <= 0:
            self._slide.close()
            raise InvalidImage("slide has no pixels")
        self._check_stored_tiles(max_tile_pixels)

    def _check_stored_tiles(self, max_tile_pixels: int) -> None:
        # OpenSlide decodes a whole stored tile to read any pixel of it: a 150-byte TIFF can claim
        # one tile as large as the image. The tile size is a claim, checked before any read.
        properties = self._slide.properties
        for level in range(self._slide.level_count):
            try:
                width = int(properties.get(f"openslide.level[{level}].tile-width", 0))
                height = int(properties.get(f"openslide.level[{level}].tile-height", 0))
            except ValueError:
                width = height = 0
            if width * height > max_tile_pixels:
                self._slide.close()
                raise ImageTooLarge(
                    f"the slide stores tiles of {width}x{height} px; at most LUNGSERVE_LARGE_IMAGE_PIXELS = "
                    f"{max_tile_pixels} pixels per stored tile are read"
                )

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    def describe(self) -> dict[str, Any]:
        import openslide

        with self._reading() as slide:  # after a failed read, even these lookups raise
            mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
            levels = slide.level_count
        return {"reader": self.reader, "format": self._vendor, "mpp": float(mpp) if mpp else None, "levels": levels}

    def prepare(self) -> None:
        pass  # every tile is read on its own

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        with self._reading() as slide:
            # The coarsest pyramid level still at or above the model's scale.
            level = slide.get_best_level_for_downsample(min(tile.width, tile.height) / size)
            downsample = slide.level_downsamples[level]
            region_size = (max(1, round(tile.width / downsample)), max(1, round(tile.height / downsample)))
            region = slide.read_region((tile.x, tile.y), level, region_size)
        rgb = Image.new("RGB", region.size, _WHITE)
        rgb.paste(region, mask=region.getchannel("A"))
        resized = rgb.resize((size, size), RESIZE_FILTER)
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))

    def thumbnail(self, max_side: int) -> Image.Image:
        # OpenSlide's get_thumbnail reads the whole best level into one buffer: 600 MB for a
        # one-level slide at the tile limit. Read that level in blocks, each shrunk into place.
        scale = min(1.0, max_side / max(self._width, self._height))
        size = (max(1, round(self._width * scale)), max(1, round(self._height * scale)))
        thumb = Image.new("RGB", size, _WHITE)
        with self._reading() as slide:
            self._thumbnail_into(thumb, slide, scale)
        return thumb

    @staticmethod
    def _thumbnail_into(thumb: Image.Image, slide: Any, scale: float) -> None:
        # Its best level in blocks, each shrunk into place (see thumbnail).
        level = slide.get_best_level_for_downsample(1 / scale)
        level_width, level_height = slide.level_dimensions[level]
        downsample = slide.level_downsamples[level]
        to_thumb = scale * downsample  # level pixels -> thumbnail pixels
        for y in range(0, level_height, _THUMBNAIL_BLOCK):
            for x in range(0, level_width, _THUMBNAIL_BLOCK):
                width, height = min(_THUMBNAIL_BLOCK, level_width - x), min(_THUMBNAIL_BLOCK, level_height - y)
                region = slide.read_region((round(x * downsample), round(y * downsample)), level, (width, height))
                left, top = round(x * to_thumb), round(y * to_thumb)
                right, bottom = round((x + width) * to_thumb), round((y + height) * to_thumb)
                block = Image.new("RGB", region.size, _WHITE)
                block.paste(region, mask=region.getchannel("A"))
                # As Image.thumbnail does (what get_thumbnail used): reduce, then resample.
                shrunk = block.resize(
                    (max(1, right - left), max(1, bottom - top)), Image.Resampling.LANCZOS, reducing_gap=2.0
                )
                thumb.paste(shrunk, (left, top))

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        """The open slide for one read: counted (see close), its errors the client's 422.

        Every OpenSlide call goes through here: its errors are sticky, so after one failed read
        any call on the slide raises, even a level lookup.
        """
        import openslide

        with self._use:
            if self._closing:
                raise SlideClosed("the slide was closed")
            self._readers += 1
        try:
            yield self._slide
        except openslide.OpenSlideError as exc:
            raise InvalidImage(f"slide data is corrupt: {exc}") from exc
        finally:
            with self._use:
                self._readers -= 1
                last = self._closing and self._readers == 0
            if last:
                self._slide.close()

    def close(self) -> None:
        """Close now, or when the last read in progress ends."""
        with self._use:
            if self._closing:
                return
            self._closing = True
            idle = self._readers == 0
        if idle:
            self._slide.close()
