"""A slide's picture, built from the tiles a job reads anyway.

OpenSlide's `get_thumbnail` reads a whole pyramid level: for a slide without a small level
(a plain tiled TIFF) that is the whole slide in memory. A job already reads every tile, so
each tile, once read, is also shrunk into a small canvas (longer side `max_side`). The
canvas is checkpointed with the tile records, so a resumed job keeps the tiles it drew before.
"""

from __future__ import annotations

import io
import math
import threading
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from service.pathology.overlay import png_bytes
from service.pathology.slides import Slide
from service.pathology.tiles import Tile

_BLANK = (255, 255, 255)


class SlidePicture:
    """A white canvas the size of the slide scaled to `max_side` (never enlarged)."""

    def __init__(self, width: int, height: int, max_side: int) -> None:
        self.scale = min(1.0, max_side / max(width, height))
        self.size = (max(1, math.ceil(width * self.scale)), max(1, math.ceil(height * self.scale)))
        self._canvas = Image.new("RGB", self.size, _BLANK)
        self._lock = threading.Lock()  # tiles are pasted from several reader threads

    def load(self, png: bytes) -> None:
        """A checkpointed canvas (ignored if its size does not match: then tiles are drawn again)."""
        with Image.open(io.BytesIO(png)) as saved:
            if saved.size == self.size:
                with self._lock:
                    self._canvas = saved.convert("RGB")

    def paste(self, tile: Tile, pixels: NDArray[np.uint8]) -> None:
        x0, y0 = math.floor(tile.x * self.scale), math.floor(tile.y * self.scale)
        x1 = max(x0 + 1, math.ceil((tile.x + tile.width) * self.scale))
        y1 = max(y0 + 1, math.ceil((tile.y + tile.height) * self.scale))
        with Image.fromarray(pixels) as image:
            small = image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        with self._lock:
            self._canvas.paste(small, (x0, y0))

    def image(self) -> Image.Image:
        with self._lock:
            return self._canvas.copy()

    def png(self) -> bytes:
        return png_bytes(self.image())


class DrawingSlide:
    """A `Slide` that pastes every tile it reads into its `picture`, and closes only when no
    read is running: a cancelled job's reads go on in their threads, and closing OpenSlide
    under them would block or crash."""

    def __init__(self, slide: Slide) -> None:
        self._slide = slide
        self.picture: SlidePicture | None = None
        self._reads = 0
        self._closed = False
        self._idle = threading.Condition()

    @property
    def width(self) -> int:
        return self._slide.width

    @property
    def height(self) -> int:
        return self._slide.height

    @property
    def reader(self) -> str:
        return self._slide.reader

    def describe(self) -> dict[str, Any]:
        return self._slide.describe()

    def prepare(self) -> None:
        self._slide.prepare()

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        with self._idle:
            if self._closed:
                raise RuntimeError("the slide is closed")
            self._reads += 1
        try:
            pixels = self._slide.read_tile(tile, size)
            if self.picture is not None:
                self.picture.paste(tile, pixels)
            return pixels
        finally:
            with self._idle:
                self._reads -= 1
                self._idle.notify_all()

    def thumbnail(self, max_side: int) -> Image.Image:
        assert self.picture is not None
        return self.picture.image()

    def close(self) -> None:
        """Blocks until running reads end: call it off the event loop."""
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._reads == 0)
        self._slide.close()
