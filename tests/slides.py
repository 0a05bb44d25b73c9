"""Whole-slide test images: a tiled, zlib-compressed BigTIFF written tile by tile from a generator.

The slide is white glass with tissue cells (768 px, the model's tile) at chosen places of the
grid, so every tissue tile's class is known. tifffile writes it from a generator of 256 px
TIFF tiles, so a 24,576 px square slide never exists in memory, and OpenSlide reads the file
as `generic-tiff`. Shared by tests/app, tests/e2e and loadtest/slide_job.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image

CELL: Final = 768  # the bundled model's tile_source_px
TIFF_TILE: Final = 256
GLASS: Final = 246  # near-white, as a slide's background


def cell_image(path: Path) -> NDArray[np.uint8]:
    """A real tile as a 768 px cell (224 px LC25000 copies are scaled back up to the source scale)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if rgb.size != (CELL, CELL):
            rgb = rgb.resize((CELL, CELL), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)


def write_slide(path: Path, width: int, height: int, cells: Mapping[tuple[int, int], NDArray[np.uint8]]) -> Path:
    """A `width` x `height` tiled BigTIFF: `cells[(col, row)]` at (col * 768, row * 768), glass elsewhere."""
    assert CELL % TIFF_TILE == 0
    # tifffile writes bytes from the generator as already-encoded tiles: glass is compressed once.
    glass = zlib.compress(np.full((TIFF_TILE, TIFF_TILE, 3), GLASS, dtype=np.uint8).tobytes())
    per_cell = CELL // TIFF_TILE

    def tiles() -> Iterator[bytes]:
        for ty in range(-(-height // TIFF_TILE)):
            for tx in range(-(-width // TIFF_TILE)):
                cell = cells.get((tx // per_cell, ty // per_cell))
                if cell is None:
                    yield glass
                    continue
                oy, ox = (ty % per_cell) * TIFF_TILE, (tx % per_cell) * TIFF_TILE
                tile = np.zeros((TIFF_TILE, TIFF_TILE, 3), dtype=np.uint8)  # edge tiles are padded
                part = cell[oy : oy + TIFF_TILE, ox : ox + TIFF_TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                yield zlib.compress(tile.tobytes(), 6)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(height, width, 3),
        dtype=np.uint8,
        tile=(TIFF_TILE, TIFF_TILE),
        compression="zlib",
        photometric="rgb",
        bigtiff=True,
    )
    return path


def spread(count: int, columns: int, rows: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` distinct (col, row) cells of a columns x rows grid, in a fixed random order."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(columns * rows, size=count, replace=False)
    return [(int(i) % columns, int(i) // columns) for i in chosen]
