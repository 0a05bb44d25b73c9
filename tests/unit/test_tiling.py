"""Tile grid geometry and the background test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from service.model.preprocess import load_image
from service.pathology.tiles import Tile, count_tiles, is_background, tile_grid, white_share


@pytest.mark.parametrize(("width", "height"), [(1536, 1536), (2000, 900), (768, 768), (5000, 3100)])
def test_grid_covers_the_image_with_whole_tiles(width: int, height: int) -> None:
    tiles = tile_grid(width, height, 768)
    assert len(tiles) == math.ceil(width / 768) * math.ceil(height / 768)  # no more tiles than needed
    assert all(t.width == 768 and t.height == 768 for t in tiles)
    assert all(t.x >= 0 and t.x + t.width <= width and t.y >= 0 and t.y + t.height <= height for t in tiles)
    covered = np.zeros((height, width), dtype=bool)
    for t in tiles:
        covered[t.y : t.y + t.height, t.x : t.x + t.width] = True
    assert covered.all()


def test_last_tile_moves_inward_instead_of_being_cut() -> None:
    xs = sorted({t.x for t in tile_grid(2000, 768, 768)})
    assert xs == [0, 768, 2000 - 768]


def test_axis_shorter_than_a_tile_gets_one_tile_of_its_length() -> None:
    assert tile_grid(500, 1600, 768) == [Tile(0, 0, 500, 768), Tile(0, 768, 500, 768), Tile(0, 832, 500, 768)]


def test_non_positive_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10, 768)


def test_glass_is_background_and_noise_is_not() -> None:
    glass = np.full((128, 128, 3), 240, dtype=np.uint8)
    glass[:5] = 120  # a sliver of tissue at the edge
    assert is_background(glass)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert not is_background(noise)


def test_bright_but_coloured_pixels_are_not_white() -> None:
    pink = np.zeros((16, 16, 3), dtype=np.uint8)
    pink[...] = (250, 200, 230)  # eosin-pale, not glass
    assert white_share(pink) == 0.0


def test_real_tissue_tiles_are_never_background(lc25000_768: Path) -> None:
    for path in sorted(lc25000_768.glob("*/*.jpeg")):
        assert not is_background(load_image(path.read_bytes(), 128)), path.name


@pytest.mark.parametrize(("width", "height"), [(2000, 900), (768, 768), (769, 1), (5000, 3001)])
def test_count_tiles_is_the_grids_length(width: int, height: int) -> None:
    assert count_tiles(width, height, 768) == len(tile_grid(width, height, 768))


def test_count_tiles_of_a_claimed_huge_image_builds_nothing() -> None:
    # A 150-byte TIFF may claim 2^32 - 1 px a side: arithmetic, not a list of starts.
    assert count_tiles(2**32 - 1, 2**32 - 1, 768) == 5_592_406**2
