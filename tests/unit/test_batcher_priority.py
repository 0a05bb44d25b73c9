"""The batcher's low-priority lane (slide jobs): normal items always go first, low ones fill up.

Same synchronisation as test_batcher.py: a gated handler holds a batch in compute while the
test queues more, so the order of the next batches is decided by the lanes alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.core.batcher import Batcher, BatcherStopped
from tests.unit.test_batcher import SAFETY_S, GatedFactory, double, gated, make_batcher, running

__all__ = ["gated"]  # the fixture, imported to be found here

pytestmark = pytest.mark.anyio


def _submit(batcher: Batcher[int, int], items: Sequence[int], *, low: bool) -> list[asyncio.Future[tuple[int, object]]]:
    reservation = batcher.reserve(len(items), low_priority=low)
    return [reservation.submit(i) for i in items]  # type: ignore[misc]


async def test_normal_items_overtake_queued_low_priority_items(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2, max_batch_delay_s=0.0)
    async with asyncio.timeout(SAFETY_S), running(batcher):
        first = _submit(batcher, [100], low=True)
        assert await handler.started.get() == [100]  # in compute: everything else now queues
        low = _submit(batcher, [101, 102, 103], low=True)
        normal = _submit(batcher, [1, 2, 3], low=False)
        assert batcher.queue_depth == 6
        handler.gate.set()
        batches = [await handler.started.get() for _ in range(3)]
        await asyncio.gather(*first, *low, *normal)
    # Normal items first (in their order); the low lane fills the batch they leave room in.
    assert batches == [[1, 2], [3, 101], [102, 103]]
    assert [f.result()[0] for f in normal] == [2, 4, 6]
    assert [f.result()[0] for f in low] == [202, 204, 206]


async def test_low_priority_items_share_the_queue_bound_and_cancel_cleanly(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=1, queue_limit=4, max_batch_delay_s=0.0)
    async with asyncio.timeout(SAFETY_S), running(batcher):
        held = _submit(batcher, [7], low=False)
        await handler.started.get()
        low = _submit(batcher, [8, 9, 10], low=True)
        assert batcher.available == 0  # one bound for both lanes
        low[0].cancel()
        await asyncio.sleep(0)  # the done-callback runs on the next loop step
        assert batcher.available == 1
        assert batcher.queue_depth == 2
        handler.gate.set()
        await asyncio.gather(*held, *low[1:])
    assert batcher.available == 4


async def test_stop_fails_queued_low_priority_items(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=1, max_batch_delay_s=0.0)
    async with asyncio.timeout(SAFETY_S):
        await batcher.start()
        _submit(batcher, [1], low=False)
        await handler.started.get()
        low = _submit(batcher, [2], low=True)
        stopping = asyncio.ensure_future(batcher.stop(drain_timeout_s=0))
        handler.gate.set()
        await stopping
        with pytest.raises(BatcherStopped):
            await low[0]
