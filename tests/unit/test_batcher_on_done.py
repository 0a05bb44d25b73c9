"""`Reservation.submit_all` and `on_done`: the model process's way into the batcher.

`on_done(future)` runs once, synchronously, as an item's future settles (result, batch error,
cancellation, shutdown), after the batcher's own bookkeeping; `submit_all` queues a frame's
items in one step. Same synchronisation as test_batcher.py (gated handlers, events only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.core.batcher import Batcher, BatcherStopped, BatchInfo
from tests.unit.test_batcher import (
    GatedFactory,
    RecordingObserver,
    double,
    fail_on_negative,
    gated,
    make_batcher,
    results,
    running,
)

__all__ = ["gated"]  # the fixture, imported to be found here

pytestmark = pytest.mark.anyio

Future = asyncio.Future[tuple[int, BatchInfo]]


class Told:
    """An `on_done` that records, for each settled future, how it ended and the free slots then."""

    def __init__(self, batcher: Batcher[int, int]) -> None:
        self.batcher = batcher
        self.ends: list[tuple[Future, str, int]] = []

    def __call__(self, future: Future) -> None:
        if future.cancelled():
            how = "cancelled"
        elif future.exception() is not None:
            how = type(future.exception()).__name__
        else:
            how = f"result {future.result()[0]}"
        self.ends.append((future, how, self.batcher.available))

    def of(self, futures: Sequence[Future]) -> list[str]:
        by_future = {id(f): how for f, how, _ in self.ends}
        return [by_future.get(id(f), "not told") for f in futures]


async def test_submit_all_queues_in_order_and_tells_each_result_once() -> None:
    observer = RecordingObserver()
    batcher = make_batcher(double, max_batch_size=4, observer=observer)
    told = Told(batcher)
    async with running(batcher):
        futures = batcher.reserve(4).submit_all([1, 2, 3, 4], told)
        assert await results(futures) == [2, 4, 6, 8]
        assert told.of(futures) == ["result 2", "result 4", "result 6", "result 8"]
        assert len(told.ends) == 4
        # Told after the bookkeeping: the batch's slots were already free.
        assert [free for _, _, free in told.ends] == [batcher.queue_limit] * 4
    assert observer.depths[0] == 4  # one queue-depth report for the four items


async def test_submit_all_refuses_more_items_than_slots_and_submits_none() -> None:
    batcher = make_batcher(double, max_batch_size=2)
    async with running(batcher):
        reservation = batcher.reserve(2)
        with pytest.raises(RuntimeError, match="2 slot"):
            reservation.submit_all([1, 2, 3])
        assert batcher.queue_depth == 0
        assert reservation.remaining == 2
        assert reservation.submit_all([]) == []
        assert await results(reservation.submit_all([5, 6])) == [10, 12]


async def test_a_failed_batch_is_told_to_every_item() -> None:
    batcher = make_batcher(fail_on_negative, max_batch_size=2)
    told = Told(batcher)
    async with running(batcher):
        futures = batcher.reserve(2).submit_all([1, -1], told)
        await asyncio.gather(*futures, return_exceptions=True)
    assert told.of(futures) == ["ValueError", "ValueError"]


async def test_cancelled_items_are_told_at_once_and_only_once(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2)
    told = Told(batcher)
    async with running(batcher):
        computing = batcher.reserve(2).submit_all([1, 2], told)
        assert await handler.started.get() == [1, 2]
        queued = batcher.reserve(3).submit_all([3, 4, 5], told)
        queued[0].cancel()  # while queued: told inside cancel(), its slot already back
        assert told.of(queued) == ["cancelled", "not told", "not told"]
        assert told.ends[-1][2] == batcher.queue_limit - 4
        computing[0].cancel()  # mid-compute: told at once too, its slot back at once
        assert told.of(computing) == ["cancelled", "not told"]
        assert told.ends[-1][2] == batcher.queue_limit - 3
        queued[0].cancel()  # cancelling again tells nothing more
        handler.gate.set()
        assert await results([computing[1], *queued[1:]]) == [4, 8, 10]
    assert told.of(computing + queued) == ["cancelled", "result 4", "cancelled", "result 8", "result 10"]
    assert len(told.ends) == 5


async def test_items_failed_at_shutdown_are_told() -> None:
    batcher = make_batcher(double, max_batch_size=4)
    told = Told(batcher)
    await batcher.start()
    futures = batcher.reserve(2).submit_all([1, 2], told)  # waits an hour for a full batch
    await batcher.stop(drain_timeout_s=0)
    assert told.of(futures) == ["BatcherStopped", "BatcherStopped"]
    with pytest.raises(BatcherStopped):
        await futures[0]


async def test_a_failing_on_done_loses_no_other_answer(caplog: pytest.LogCaptureFixture) -> None:
    batcher = make_batcher(double, max_batch_size=2)

    def broken(future: Future) -> None:
        raise RuntimeError("bug in on_done")

    async with running(batcher):
        futures = batcher.reserve(2).submit_all([1, 2], broken)
        assert await results(futures) == [2, 4]
    assert "on_done failed" in caplog.text
    assert batcher.available == batcher.queue_limit
