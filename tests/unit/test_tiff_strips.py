"""Plain (stripped) TIFF read band by band: the same tiles as Pillow's, without decoding it whole."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.errors import ImageTooLarge
from service.pathology.slides import PillowSlide, open_slide
from service.pathology.tiff_strips import StripLayout, StripTiffSlide
from service.pathology.tiles import tile_grid


def _pixels(width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


@pytest.mark.parametrize(
    "options",
    [
        {"compression": None},
        {"compression": "zlib"},
        {"compression": "zlib", "predictor": True},
        {"compression": "zlib", "rowsperstrip": 7},
    ],
)
def test_a_stripped_tiff_reads_tile_by_tile_like_pillow(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _pixels(2000, 900), photometric="rgb", **options)
    slide = open_slide(path, max_pixels=10**7, tile_px=768, size=64)
    assert isinstance(slide, StripTiffSlide)
    whole = PillowSlide(path, max_pixels=10**7, tile_px=768, size=64)
    try:
        for tile in tile_grid(2000, 900, 768):
            np.testing.assert_array_equal(slide.read_tile(tile, 64), whole.read_tile(tile, 64))
        assert slide.thumbnail(256).size == whole.thumbnail(256).size
    finally:
        slide.close()
        whole.close()


def test_a_large_stripped_tiff_is_never_decoded_whole(tmp_path: Path) -> None:
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, _pixels(12_288, 6_144), photometric="rgb")  # 226 MB of pixels
    slide = open_slide(path, max_pixels=10**6, tile_px=768, size=64)  # over Pillow's limit: no matter
    tracemalloc.start()
    try:
        for tile in tile_grid(slide.width, slide.height, 768):
            slide.read_tile(tile, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        slide.close()
    assert peak < 100 * 2**20  # two bands of 768 rows (57 MB), never the 226 MB image


def test_a_claimed_width_is_checked_before_a_band_is_allocated(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    path.write_bytes(b"")
    layout = StripLayout(2**31, 2**31, 3, 16, np.zeros(1, np.uint64), np.zeros(1, np.uint64), False, False)
    with pytest.raises(ImageTooLarge, match="tiled"):
        StripTiffSlide(path, layout, 768)
