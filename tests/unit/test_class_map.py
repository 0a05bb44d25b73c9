"""The tile pipeline: grid order, background skipped, and never more than `window` decoded tiles."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from service.errors import InvalidImage
from service.pathology.class_map import class_map
from service.pathology.tiles import Tile, tile_grid


class FakeSlide:
    """Tiles whose x is a multiple of 3 * side are glass; the others carry their index as colour."""

    reader = "fake"

    def __init__(self, width: int, height: int, side: int, broken: Tile | None = None, glass: bool = True) -> None:
        self.width, self.height, self.side, self.broken, self.glass = width, height, side, broken, glass

    def describe(self) -> dict[str, Any]:
        return {"reader": self.reader}

    def prepare(self) -> None:
        pass

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        if tile == self.broken:
            raise InvalidImage("slide data is corrupt")
        if self.glass and tile.x % (3 * self.side) == 0:
            return np.full((size, size, 3), 245, dtype=np.uint8)
        return np.full((size, size, 3), (tile.x // self.side) % 200, dtype=np.uint8)

    def thumbnail(self, max_side: int) -> Image.Image:
        return Image.new("RGB", (max_side, max_side))

    def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_outcomes_keep_grid_order_and_skip_background() -> None:
    slide = FakeSlide(6 * 10, 2 * 10, 10)
    tiles = tile_grid(slide.width, slide.height, 10)

    async def classify(image: NDArray[np.uint8]) -> int:
        await asyncio.sleep(0)
        return int(image[0, 0, 0])

    with ThreadPoolExecutor(2) as pool:
        outcomes = await class_map(slide, tiles, size=4, pool=pool, classify=classify, window=3)
    assert [o.tile for o in outcomes] == tiles
    for o in outcomes:
        if o.tile.x % 30 == 0:
            assert o.result is None
        else:
            assert o.result == o.tile.x // 10


@pytest.mark.anyio
async def test_never_more_than_window_tiles_decoded_at_once() -> None:
    slide = FakeSlide(40 * 10, 10, 10, glass=False)
    tiles = tile_grid(slide.width, slide.height, 10)
    alive = 0
    peak = 0
    saturated = asyncio.Event()

    def on_read() -> None:
        nonlocal alive, peak
        alive += 1
        peak = max(peak, alive)
        if alive == 4:
            saturated.set()

    async def classify(image: NDArray[np.uint8]) -> int:
        nonlocal alive
        await saturated.wait()  # like a batcher holding tiles until the batch is full
        alive -= 1
        return 0

    with ThreadPoolExecutor(2) as pool:
        outcomes = await class_map(slide, tiles, size=4, pool=pool, classify=classify, window=4, on_read=on_read)
    assert len(outcomes) == 40
    assert peak == 4


@pytest.mark.anyio
async def test_a_broken_tile_fails_the_request_with_its_own_error() -> None:
    slide = FakeSlide(5 * 10, 10, 10, broken=Tile(20, 0, 10, 10))
    tiles = tile_grid(slide.width, slide.height, 10)

    async def classify(image: NDArray[np.uint8]) -> int:
        return 0

    with ThreadPoolExecutor(2) as pool, pytest.raises(InvalidImage, match="corrupt"):
        await class_map(slide, tiles, size=4, pool=pool, classify=classify, window=2)


class GatedSlide(FakeSlide):
    """A slide whose tile reads block, in the pool, until the test releases them."""

    def __init__(self) -> None:
        super().__init__(10, 10, 10, glass=False)
        self.started = threading.Event()
        self.release = threading.Event()
        self.reads_ended = 0

    def read_tile(self, tile: Tile, size: int) -> NDArray[np.uint8]:
        self.started.set()
        self.release.wait()
        self.reads_ended += 1
        return super().read_tile(tile, size)


@pytest.mark.anyio
async def test_a_cancelled_class_map_ends_only_after_the_read_it_started() -> None:
    """The caller closes the slide once class_map is done (OpenSlide aborts the process when a
    slide is closed under a read): cancelled, it must still wait for its reads in the pool."""
    slide = GatedSlide()
    loop = asyncio.get_running_loop()

    async def classify(image: NDArray[np.uint8]) -> int:
        return 0

    with ThreadPoolExecutor(1) as pool:
        tiles = [Tile(0, 0, 10, 10)]
        task = asyncio.ensure_future(class_map(slide, tiles, size=4, pool=pool, classify=classify, window=1))
        try:
            await loop.run_in_executor(None, slide.started.wait)
            task.cancel()
            for _ in range(100):  # loop turns, not time: without the wait, the cancellation ends in a few
                await asyncio.sleep(0)
            assert not task.done()
        finally:
            slide.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert slide.reads_ended == 1
