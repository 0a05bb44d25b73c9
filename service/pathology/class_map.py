"""A large image as a class map: tiles at the training scale, through the model, with bounded memory.

The core of `/analyze`, without HTTP. `class_map` walks the tile grid with a fixed number of
workers; each reads one tile (in the decode pool), skips it if it is background, or hands it
to `classify` (the batcher, under the request's single admission) and waits for its answer.
So at most `window` decoded tiles exist at once, whatever the image size, while the batcher
still sees enough tiles to form full batches.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from service.pathology.slides import Slide
from service.pathology.tiles import Tile, is_background

R = TypeVar("R")
TileImage = NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class TileOutcome(Generic[R]):
    """One tile: its model answer, or None when it was background (skipped, never classified)."""

    tile: Tile
    result: R | None


async def class_map(
    slide: Slide,
    tiles: Sequence[Tile],
    *,
    size: int,
    pool: Executor,
    classify: Callable[[TileImage], Awaitable[R]],
    window: int,
    on_read: Callable[[], None] | None = None,
    on_outcome: Callable[[int, TileOutcome[R]], None] | None = None,
) -> list[TileOutcome[R]]:
    """Every tile's outcome, in grid order; the first failure cancels the rest and is raised.

    `on_outcome(i, outcome)` is called as soon as `tiles[i]` is done (slide jobs checkpoint
    from it, so a cancelled run still keeps every tile it finished).
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    outcomes: list[TileOutcome[R] | None] = [None] * len(tiles)
    indices = iter(range(len(tiles)))
    loop = asyncio.get_running_loop()

    def read(tile: Tile) -> tuple[TileImage, bool]:
        image = slide.read_tile(tile, size)
        return image, is_background(image)

    # Reads in the pool, kept until they have ended: a cancelled worker stops waiting for its
    # read, but the thread goes on reading the slide, which our caller closes once we return.
    reads: set[Future[tuple[TileImage, bool]]] = set()

    async def worker() -> None:
        # `next` on a shared iterator: each index goes to exactly one worker (one event loop).
        for i in indices:
            tile = tiles[i]
            reading = pool.submit(read, tile)
            reads.add(reading)
            image, background = await asyncio.wrap_future(reading, loop=loop)
            reads.discard(reading)
            if on_read is not None:
                on_read()
            if background:
                outcome: TileOutcome[R] = TileOutcome(tile, None)
            else:
                result = await classify(image)
                outcome = TileOutcome(tile, result)
            del image  # this worker's decoded tile is released before it reads the next
            outcomes[i] = outcome
            if on_outcome is not None:
                on_outcome(i, outcome)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in itertools.repeat(None, min(window, len(tiles))):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        # The first tile's error is the request's error (a domain error maps to its 4xx/5xx).
        raise failed.exceptions[0] from None
    finally:
        running = [asyncio.wrap_future(f, loop=loop) for f in reads if not f.done()]
        if running:  # their results and errors are nobody's any more: gathered, not logged
            await asyncio.gather(*running, return_exceptions=True)
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(tiles)
    return done
