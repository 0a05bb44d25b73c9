"""Large-image readers: Pillow for plain images, OpenSlide for a pyramidal TIFF made here."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.model.preprocess import load_image
from service.pathology.slides import OpenSlideSlide, PillowSlide, SlideClosed, open_slide
from service.pathology.tiles import Tile, tile_grid
from tests.hostile_files import cut_after_scans, progressive, scan_bomb, tiled_tiff_claiming


def _rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def write_pyramid(path: Path, image: np.ndarray, levels: int = 3) -> None:
    """A tiled TIFF with half-size pyramid levels (what scanners and libvips write)."""
    with tifffile.TiffWriter(path) as tif:
        level = image
        for i in range(levels):
            tif.write(level, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=0 if i == 0 else 1)
            level = np.asarray(Image.fromarray(level).reduce(2))


def test_a_plain_png_tile_reads_like_that_tile_uploaded_alone(tmp_path: Path) -> None:
    pixels = _rgb(2000, 900)
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    slide = open_slide(path, max_pixels=10_000_000, tile_px=768, size=64)
    assert isinstance(slide, PillowSlide)
    assert (slide.width, slide.height) == (2000, 900)
    for tile in tile_grid(2000, 900, 768):
        alone = io.BytesIO()
        Image.fromarray(pixels[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]).save(alone, "PNG")
        np.testing.assert_array_equal(slide.read_tile(tile, 64), load_image(alone.getvalue(), 64))
    assert max(slide.thumbnail(256).size) == 256


def test_a_large_jpeg_is_decoded_at_the_dct_scale_of_its_tiles(lc25000_768: Path, tmp_path: Path) -> None:
    """A 2x1 mosaic JPEG: each tile comes out close to its original through load_image."""
    originals = sorted(lc25000_768.glob("*/*.jpeg"))[:2]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in originals]
    path = tmp_path / "pair.jpeg"
    Image.fromarray(np.concatenate(arrays, axis=1)).save(path, quality=95)
    slide = open_slide(path, max_pixels=10_000_000, tile_px=768, size=128)
    assert isinstance(slide, PillowSlide)
    for i, original in enumerate(originals):
        tile = slide.read_tile(Tile(768 * i, 0, 768, 768), 128).astype(np.int16)
        direct = load_image(original.read_bytes(), 128).astype(np.int16)
        assert np.abs(tile - direct).mean() < 3.0
    # The picture is decoded again at its own scale: sharper than the tiles' 1/4 scale allows.
    assert slide.thumbnail(1024).size == (1024, 512)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000)).save(path)
    with pytest.raises(ImageTooLarge, match="9000000 pixels"):
        open_slide(path, max_pixels=1_000_000, tile_px=768, size=64)


def test_garbage_is_an_invalid_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not an image at all")
    with pytest.raises(InvalidImage):
        open_slide(path, max_pixels=1_000_000, tile_px=768, size=64)


def test_a_pyramidal_tiff_is_read_through_openslide_level_by_level(tmp_path: Path) -> None:
    pixels = _rgb(3072, 1536, seed=3)
    path = tmp_path / "slide.tif"
    write_pyramid(path, pixels)
    # The pixel limit of plain images does not apply: a slide is read tile by tile.
    slide = open_slide(path, max_pixels=1_000, tile_px=768, size=128)
    assert isinstance(slide, OpenSlideSlide)
    assert (slide.width, slide.height) == (3072, 1536)
    assert slide.describe()["levels"] == 3
    for tile in tile_grid(3072, 1536, 768):
        expected = np.asarray(
            Image.fromarray(pixels[tile.y : tile.y + 768, tile.x : tile.x + 768]).resize(
                (128, 128), Image.Resampling.BILINEAR
            )
        ).astype(np.int16)
        got = slide.read_tile(tile, 128).astype(np.int16)
        assert got.shape == (128, 128, 3)
        assert np.abs(got - expected).mean() < 4.0  # read from the 4x level, not the full one
    thumb = slide.thumbnail(300)
    assert thumb.mode == "RGB"
    assert max(thumb.size) == 300
    slide.close()


def test_closing_a_slide_under_a_read_waits_for_the_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSlide aborts the whole process (an assertion in its TIFF cache) when a slide is
    closed while another thread reads it; a failed or cancelled /analyze closes its slide with
    pool threads still reading. The close waits for the last read."""
    path = tmp_path / "slide.tif"
    write_pyramid(path, _rgb(1536, 1536, seed=4))
    slide = open_slide(path, max_pixels=1_000, tile_px=768, size=64)
    assert isinstance(slide, OpenSlideSlide)
    inside, release = threading.Event(), threading.Event()
    real_read_region = slide._slide.read_region

    def gated_read_region(*args: Any) -> Image.Image:
        inside.set()
        release.wait()
        return real_read_region(*args)

    monkeypatch.setattr(slide._slide, "read_region", gated_read_region)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(slide.read_tile, Tile(0, 0, 768, 768), 64)
        try:
            inside.wait()
            slide.close()  # returns at once; the slide stays open for the read in progress
        finally:
            release.set()
        assert reading.result().shape == (64, 64, 3)
    with pytest.raises(SlideClosed):
        slide.read_tile(Tile(0, 0, 768, 768), 64)
    slide.close()  # twice is harmless


# --- issue 22: the same validity path as /predict; claimed tile sizes ---------------------------


def test_a_plain_jpeg_refuses_a_scan_bomb_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "bomb.jpeg"
    path.write_bytes(scan_bomb(512, 200))
    with pytest.raises(ImageTooLarge, match="scans"):
        open_slide(path, max_pixels=10_000_000, tile_px=768, size=64)


def test_a_truncated_progressive_jpeg_is_invalid_when_decoded(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpeg"
    data = progressive(Image.effect_noise((1600, 1600), 50).convert("RGB"))
    path.write_bytes(data[: len(data) * 97 // 100] + b"\xff\xd9")
    slide = open_slide(path, max_pixels=10_000_000, tile_px=768, size=64)
    try:
        with pytest.raises(InvalidImage, match="truncated"):
            slide.prepare()
    finally:
        slide.close()
    path.write_bytes(cut_after_scans(data, 2))
    with pytest.raises(InvalidImage, match="truncated"):
        open_slide(path, max_pixels=10_000_000, tile_px=768, size=64)


def test_a_slide_claiming_one_huge_stored_tile_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    path = tmp_path / "claim.tiff"
    path.write_bytes(tiled_tiff_claiming(3000, 3000))
    with pytest.raises(ImageTooLarge, match="stored tile"):
        open_slide(path, max_pixels=10_000_000, tile_px=768, size=64, max_tile_pixels=4_000_000)
    # Allowed to read it, the missing pixels are the client's 422, thumbnail included.
    slide = open_slide(path, max_pixels=10_000_000, tile_px=768, size=64, max_tile_pixels=10_000_000)
    try:
        with pytest.raises(InvalidImage):
            slide.read_tile(Tile(0, 0, 768, 768), 64)
        with pytest.raises(InvalidImage):
            slide.thumbnail(256)
    finally:
        slide.close()


def test_every_tile_read_after_a_failed_one_is_still_the_clients_422(tmp_path: Path) -> None:
    """OpenSlide's errors are sticky: after one failed read, every call on the slide raises, even
    the level lookup. /analyze reads tiles on several threads, so the next tile's read (seen
    in CI: a 500) must be the same InvalidImage as the first."""
    pytest.importorskip("openslide")
    path = tmp_path / "missing.tiff"
    path.write_bytes(tiled_tiff_claiming(1500, 1500, tile=256))
    slide = open_slide(path, max_pixels=10_000_000, tile_px=768, size=64)
    try:
        for tile in (Tile(0, 0, 768, 768), Tile(768, 0, 732, 768), Tile(0, 0, 768, 768)):
            with pytest.raises(InvalidImage, match="corrupt"):
                slide.read_tile(tile, 64)
        with pytest.raises(InvalidImage, match="corrupt"):
            slide.describe()
    finally:
        slide.close()


def test_a_one_level_slide_thumbnail_is_read_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No pyramid: the thumbnail comes from level 0, read block by block (never the whole level at once).
    openslide = pytest.importorskip("openslide")
    from service.pathology import slides

    # Blocks of 600 px: a multiple of the 3x reduce step of a 6x shrink, so the blocks line up
    # with the one-buffer reference exactly (other sizes shift the reduce grid by a pixel).
    monkeypatch.setattr(slides, "_THUMBNAIL_BLOCK", 600)
    pixels = _rgb(3000, 1800, seed=5)
    path = tmp_path / "flat.tif"
    write_pyramid(path, pixels, levels=1)
    slide = open_slide(path, max_pixels=1_000, tile_px=768, size=128)
    try:
        thumb = slide.thumbnail(500)
    finally:
        slide.close()
    reference = openslide.OpenSlide(str(path)).get_thumbnail((500, 500)).convert("RGB")
    assert (thumb.mode, thumb.size) == ("RGB", reference.size)
    difference = np.abs(np.asarray(thumb, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert difference.mean() < 0.5
