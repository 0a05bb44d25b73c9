"""Synthetic large images for /analyze benchmarks, made from real 768 px LC25000 originals.

`write_pyramid_tiff` streams a tiled, pyramidal TIFF (zlib) of any size tile by tile, so the
writer never holds the image: each 768 px block of the field is one original (rotated or
flipped by its position) or, in a fixed share of blocks, empty white glass. `write_plain_jpeg`
makes the same field as one plain JPEG (held in memory once: keep it to tens of megapixels).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image

BLOCK: Final = 768  # LC25000 original side, the model's tile in source pixels
TIFF_TILE: Final = 256
GLASS: Final = 242
GLASS_EVERY: Final = 5  # every fifth block is background


def load_originals(folder: Path) -> list[NDArray[np.uint8]]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*/*.jpeg"))]


def _block(originals: list[NDArray[np.uint8]], bx: int, by: int) -> NDArray[np.uint8] | None:
    """The content of block (bx, by): None for glass, else a transformed original."""
    k = bx * 7 + by * 3
    if k % GLASS_EVERY == 0:
        return None
    image = originals[k % len(originals)]
    image = np.rot90(image, k % 4)
    return np.ascontiguousarray(image[:, ::-1] if (k // 4) % 2 else image)


class Field:
    """The synthetic field at one pyramid level (downsample 2**level), rendered on demand."""

    def __init__(self, originals: list[NDArray[np.uint8]], width: int, height: int, level: int) -> None:
        self.factor = 2**level
        self.width, self.height = -(-width // self.factor), -(-height // self.factor)
        self.block = BLOCK // self.factor
        self._cache: dict[tuple[int, int], NDArray[np.uint8] | None] = {}
        self._originals = [
            np.asarray(Image.fromarray(o).reduce(self.factor)) if self.factor > 1 else o for o in originals
        ]

    def _block(self, bx: int, by: int) -> NDArray[np.uint8] | None:
        key = (bx, by)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = _block(self._originals, bx, by)
        return self._cache[key]

    def region(self, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        out = np.full((h, w, 3), GLASS, dtype=np.uint8)
        b = self.block
        for by in range(y // b, (y + h - 1) // b + 1):
            for bx in range(x // b, (x + w - 1) // b + 1):
                content = self._block(bx, by)
                if content is None:
                    continue
                x0, y0 = max(x, bx * b), max(y, by * b)
                x1, y1 = min(x + w, (bx + 1) * b, self.width), min(y + h, (by + 1) * b, self.height)
                if x1 > x0 and y1 > y0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = content[
                        y0 - by * b : y1 - by * b, x0 - bx * b : x1 - bx * b
                    ]
        return out

    def tiles(self) -> Iterator[NDArray[np.uint8]]:
        for y in range(0, self.height, TIFF_TILE):
            for x in range(0, self.width, TIFF_TILE):
                yield self.region(x, y, TIFF_TILE, TIFF_TILE)


def write_pyramid_tiff(path: Path, originals: list[NDArray[np.uint8]], width: int, height: int) -> None:
    """A tiled pyramidal TIFF (levels down to < 2048 px), written tile by tile."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level = 0
        while True:
            field = Field(originals, width, height, level)
            tif.write(
                field.tiles(),
                shape=(field.height, field.width, 3),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib",
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
            )
            if max(field.width, field.height) < 2048:
                break
            level += 1


def write_plain_jpeg(path: Path, originals: list[NDArray[np.uint8]], width: int, height: int) -> None:
    Image.fromarray(Field(originals, width, height, 0).region(0, 0, width, height)).save(path, quality=90)
