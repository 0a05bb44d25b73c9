"""A batcher bounded by a shared count (`QueueBound`): the fronts of one server, each with its own
batcher, hold `queue_limit` together, and every way a slot ends gives the shared one back.

A real `QueueBound` on a temporary file (two cells: two fronts), fake handlers. Synchronised on
events (a gated handler reports each batch, then blocks); `asyncio.timeout` only turns a hang into
a failure.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from service.core.batcher import Batcher, BatcherStopped, QueueFull
from service.core.queue_bound import QueueBound

pytestmark = pytest.mark.anyio

LIMIT = 4
SAFETY_S = 30.0
LONG_DELAY_S = 3600.0  # batches go when full (or at stop), never after this


class Gated:
    """Reports each batch on `started`, then blocks until `gate` is set; fails on negative items."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.started: asyncio.Queue[list[int]] = asyncio.Queue()
        self.gate = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int]:
        batch = list(items)
        self.loop.call_soon_threadsafe(self.started.put_nowait, batch)
        self.gate.wait()
        if any(x < 0 for x in batch):
            raise ValueError("a bad batch")
        return [2 * x for x in batch]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "queue"
    QueueBound.create(path)
    return path


@pytest.fixture
def bounds(path: Path) -> Iterator[tuple[QueueBound, QueueBound]]:
    a, b = QueueBound(path, 0, LIMIT), QueueBound(path, 1, LIMIT)
    yield a, b
    a.close()
    b.close()


def batcher(handler: Gated | None, bound: QueueBound, max_batch_size: int = 2) -> Batcher[int, int]:
    return Batcher(
        handler if handler is not None else (lambda items: [2 * x for x in items]),
        max_batch_size=max_batch_size,
        max_batch_delay_s=LONG_DELAY_S,
        queue_limit=LIMIT,
        dispatch_when_idle=False,
        shared_bound=bound,
    )


@asynccontextmanager
async def running(*batchers: Batcher[int, int]) -> AsyncIterator[None]:
    for b in batchers:
        await b.start()
    try:
        async with asyncio.timeout(SAFETY_S):
            yield
    finally:
        for b in batchers:
            await b.stop(drain_timeout_s=5.0)


async def test_two_batchers_hold_one_queue_limit(bounds: tuple[QueueBound, QueueBound]) -> None:
    a, b = batcher(None, bounds[0]), batcher(None, bounds[1])
    async with running(a, b):
        held = a.reserve(3)
        assert (bounds[0].mine, bounds[1].mine, bounds[0].used) == (3, 0, 3)
        assert b.available == 1  # its own bound has 4 free; the server's has 1
        with pytest.raises(QueueFull) as full:
            b.reserve(2)  # all or nothing: a refused reservation takes no shared slot
        assert (full.value.requested, full.value.available, full.value.queue_limit) == (2, 1, LIMIT)
        assert bounds[0].used == 3
        last = b.reserve(1)
        assert a.available == b.available == 0
        with pytest.raises(QueueFull):
            a.reserve(1)  # a has one of its own slots free, but the server is full
        held.release()
        assert b.available == 3
        assert bounds[0].used == 1
        last.release()
        assert bounds[0].used == 0
        assert a.available == b.available == LIMIT


async def test_answered_and_failed_batches_give_their_shared_slots_back(
    bounds: tuple[QueueBound, QueueBound],
) -> None:
    handler = Gated()
    a = batcher(handler, bounds[0])
    async with running(a):
        reservation = a.reserve(4)
        ok = [reservation.submit(1), reservation.submit(2)]
        bad = [reservation.submit(-1), reservation.submit(3)]
        assert await handler.started.get() == [1, 2]
        assert bounds[0].used == 4  # queued and computing images still hold theirs
        handler.gate.set()
        assert [r for r, _ in await asyncio.gather(*ok)] == [2, 4]
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)
        assert bounds[0].used == 0


async def test_cancelled_images_give_their_shared_slots_back_at_once(
    bounds: tuple[QueueBound, QueueBound],
) -> None:
    """A client that goes away (its future cancelled): queued, or while its batch computes."""
    handler = Gated()
    a = batcher(handler, bounds[0])
    async with running(a):
        reservation = a.reserve(4)
        computing = [reservation.submit(1), reservation.submit(2)]
        assert await handler.started.get() == [1, 2]
        queued = reservation.submit(3)
        computing[0].cancel()  # mid-compute: its slot returns now, not when the batch ends
        queued.cancel()  # still queued: dropped, never computed
        await asyncio.sleep(0)  # the done-callbacks run on the next turn of the loop
        assert bounds[0].used == 2  # the second computing image, and one reserved, unsubmitted
        assert bounds[1].has_room()
        reservation.release()  # e.g. a file that failed to decode
        assert bounds[0].used == 1
        handler.gate.set()
        assert (await computing[1])[0] == 4
        assert bounds[0].used == 0


async def test_shutdown_gives_every_shared_slot_back(bounds: tuple[QueueBound, QueueBound]) -> None:
    handler = Gated()
    a = batcher(handler, bounds[0], max_batch_size=4)
    await a.start()
    reservation = a.reserve(4)
    queued = [reservation.submit(1), reservation.submit(2)]  # the batch waits to fill: never computed
    assert bounds[0].used == 4
    async with asyncio.timeout(SAFETY_S):
        await a.stop(drain_timeout_s=0)  # no drain: what is left fails
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, BatcherStopped) for o in outcomes)
    assert bounds[0].used == 2  # the two reserved, never submitted, until the request lets go
    with pytest.raises(BatcherStopped):
        reservation.submit(3)  # too late: refused, and its slot given back
    assert bounds[0].used == 1
    reservation.release()
    assert bounds[0].used == 0
    with pytest.raises(BatcherStopped):
        a.reserve(1)  # a stopping batcher refuses before taking anything shared
    assert bounds[0].used == 0
