"""The micro-batcher with fake handlers.

Synchronisation is on events only: a gated handler reports each batch it receives through an
asyncio queue and then blocks on a threading.Event, which lets a test hold a batch in compute
while it queues more. Delays are either very long (a test finishing proves the delay was not
waited for) or tiny with nothing else to wait for. `asyncio.timeout(SAFETY_S)` only turns a
hang into a failure; nothing asserts durations.

Every batcher comes from `make_batcher(handler, **overrides)`. Its default
`dispatch_when_idle=False` checks the full-or-delay rules on their own; the idle rule (dispatch
early when no reservation is open) has its own tests at the end; the pure rule
`dispatch_delay` is tested without a batcher in test_batch_rule.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import pytest

from service.core.batcher import (
    Batcher,
    BatcherStopped,
    BatchInfo,
    HandlerResultError,
    QueueFull,
)

T = TypeVar("T")
R = TypeVar("R")

SAFETY_S = 30.0  # generous: the machine is shared with a training job
LONG_DELAY_S = 3600.0  # never reached by a passing test
SHORT_DELAY_S = 0.005


def double(items: Sequence[int]) -> list[int]:
    return [2 * x for x in items]


def make_batcher(handler: Callable[[Sequence[T]], Sequence[R]], **overrides: Any) -> Batcher[T, R]:
    """The one constructor call: a small bound, an hour of delay and no idle rule, unless overridden."""
    settings: dict[str, Any] = {
        "max_batch_size": 4,
        "max_batch_delay_s": LONG_DELAY_S,
        "queue_limit": 16,
        "dispatch_when_idle": False,
    }
    return Batcher(handler, **(settings | overrides))


class Recording(Generic[T, R]):
    """Wraps a handler; records every batch it is called with (from the worker thread)."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]]) -> None:
        self.fn = fn
        self.batches: list[list[T]] = []
        self._lock = threading.Lock()

    def __call__(self, items: Sequence[T]) -> Sequence[R]:
        batch = list(items)
        with self._lock:
            self.batches.append(batch)
        return self.fn(batch)


class Gated(Generic[T, R]):
    """Reports each batch on `started`, then blocks until `gate` is set, then calls `fn`."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]]) -> None:
        self.fn = fn
        self.loop = asyncio.get_running_loop()
        self.started: asyncio.Queue[list[T]] = asyncio.Queue()
        self.gate = threading.Event()

    def __call__(self, items: Sequence[T]) -> Sequence[R]:
        batch = list(items)
        self.loop.call_soon_threadsafe(self.started.put_nowait, batch)
        self.gate.wait()
        return self.fn(batch)


@pytest.fixture
def gated() -> Iterator[Callable[[Callable[[list[int]], Sequence[int]]], Gated[int, int]]]:
    """Factory for gated handlers; every gate is opened at teardown so no thread is left blocked."""
    made: list[Gated[int, int]] = []

    def make(fn: Callable[[list[int]], Sequence[int]]) -> Gated[int, int]:
        handler: Gated[int, int] = Gated(fn)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.gate.set()


GatedFactory = Callable[[Callable[[list[int]], Sequence[int]]], Gated[int, int]]


class RecordingObserver:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.starts: list[tuple[int, int, list[float]]] = []
        self.ends: list[tuple[int, int, float, BaseException | None]] = []
        self.in_flight: list[int] = []
        self.dropped: list[int] = []
        self.drop_seen = asyncio.Event()

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def on_batch_start(self, batch_id: int, size: int, queue_waits_s: Sequence[float]) -> None:
        self.starts.append((batch_id, size, list(queue_waits_s)))

    def on_batch_end(self, batch_id: int, size: int, duration_s: float, error: BaseException | None) -> None:
        self.ends.append((batch_id, size, duration_s, error))

    def on_in_flight(self, batches: int) -> None:
        self.in_flight.append(batches)

    def on_dropped_cancelled(self, count: int) -> None:
        self.dropped.append(count)
        self.drop_seen.set()


class BrokenObserver(RecordingObserver):
    def on_batch_start(self, batch_id: int, size: int, queue_waits_s: Sequence[float]) -> None:
        raise RuntimeError("metrics bug")


@asynccontextmanager
async def running(batcher: Batcher[Any, Any]) -> AsyncIterator[Batcher[Any, Any]]:
    await batcher.start()
    try:
        async with asyncio.timeout(SAFETY_S):
            yield batcher
    finally:
        await batcher.stop(drain_timeout_s=5.0)


def submit_all(batcher: Batcher[T, R], items: Sequence[T]) -> list[asyncio.Future[tuple[R, BatchInfo]]]:
    reservation = batcher.reserve(len(items))
    return [reservation.submit(item) for item in items]


async def results(futures: Sequence[asyncio.Future[tuple[R, BatchInfo]]]) -> list[R]:
    return [result for result, _ in await asyncio.gather(*futures)]


# -- dispatch ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_full_batch_dispatches_without_waiting_for_the_delay() -> None:
    handler = Recording(double)
    batcher = make_batcher(handler, max_batch_size=4)
    async with running(batcher):
        assert await results(submit_all(batcher, [1, 2, 3, 4])) == [2, 4, 6, 8]
    assert handler.batches == [[1, 2, 3, 4]]


@pytest.mark.anyio
async def test_partial_batch_dispatches_after_the_delay() -> None:
    handler = Recording(double)
    batcher = make_batcher(handler, max_batch_size=8, max_batch_delay_s=SHORT_DELAY_S)
    async with running(batcher):
        assert await results(submit_all(batcher, [21])) == [42]
    assert handler.batches == [[21]]


@pytest.mark.anyio
async def test_backlog_is_split_into_batches_no_larger_than_the_max() -> None:
    handler: Recording[int, str] = Recording(lambda batch: [f"r{x}" for x in batch])
    batcher: Batcher[int, str] = make_batcher(handler, max_batch_size=3, max_batch_delay_s=SHORT_DELAY_S)
    async with running(batcher):
        # All ten are queued before the dispatcher runs once (no await in between).
        futures = submit_all(batcher, list(range(10)))
        outcomes = await asyncio.gather(*futures)
    assert [len(b) for b in handler.batches] == [3, 3, 3, 1]
    assert [x for b in handler.batches for x in b] == list(range(10))
    # Each future got the result of its own item, and the info of the batch that computed it.
    assert [result for result, _ in outcomes] == [f"r{x}" for x in range(10)]
    infos = [info for _, info in outcomes]
    assert [info.batch_id for info in infos] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert [info.size for info in infos] == [3, 3, 3, 3, 3, 3, 3, 3, 3, 1]
    assert all(info.queue_wait_s >= 0 and info.compute_s >= 0 for info in infos)
    assert batcher.available == batcher.queue_limit


@pytest.mark.anyio
async def test_next_batch_is_gathered_while_one_computes_and_dispatched_after(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2)
    async with running(batcher):
        first = submit_all(batcher, [1, 2])
        assert await handler.started.get() == [1, 2]  # batch 1 is now blocked in compute
        second = submit_all(batcher, [3, 4])
        assert batcher.queue_depth == 2
        assert batcher.in_flight == 1
        assert handler.started.empty()  # max_in_flight_batches=1: batch 2 waits for the handler
        handler.gate.set()
        assert await handler.started.get() == [3, 4]
        assert await results(first) == [2, 4]
        assert await results(second) == [6, 8]


@pytest.mark.anyio
async def test_max_in_flight_runs_batches_concurrently(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=1, max_in_flight_batches=2)
    async with running(batcher):
        futures = submit_all(batcher, [1, 2, 3])
        # Both compute slots are taken while the gate is closed; the third item waits.
        assert sorted([await handler.started.get(), await handler.started.get()]) == [[1], [2]]
        assert batcher.in_flight == 2
        assert batcher.queue_depth == 1
        handler.gate.set()
        assert await results(futures) == [2, 4, 6]


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_futures_are_dropped_before_compute(gated: GatedFactory) -> None:
    handler = gated(double)
    observer = RecordingObserver()
    batcher = make_batcher(handler, max_batch_size=2, observer=observer)
    async with running(batcher):
        first = submit_all(batcher, [1, 2])
        assert await handler.started.get() == [1, 2]
        c, d, e = submit_all(batcher, [3, 4, 5])
        d.cancel()
        handler.gate.set()
        # Without d, the next full batch is [3, 5].
        assert await handler.started.get() == [3, 5]
        assert await results(first) == [2, 4]
        assert await results([c, e]) == [6, 10]
    assert d.cancelled()
    assert observer.dropped == [1]
    assert [size for _, size, _ in observer.starts] == [2, 2]
    assert batcher.available == batcher.queue_limit


@pytest.mark.anyio
async def test_cancelled_slot_is_returned_at_once(gated: GatedFactory) -> None:
    handler = gated(double)
    observer = RecordingObserver()
    batcher = make_batcher(handler, max_batch_size=8, queue_limit=4, observer=observer)
    async with running(batcher):
        futures = submit_all(batcher, [1, 2, 3, 4])
        assert batcher.available == 0
        with pytest.raises(QueueFull):
            batcher.reserve(1)
        futures[0].cancel()
        await observer.drop_seen.wait()  # the future's done-callback dropped the item
        assert observer.dropped == [1]
        assert batcher.available == 1
        batcher.reserve(1).release()
        for future in futures[1:]:
            future.cancel()
        handler.gate.set()
    assert handler.started.empty()  # nothing reached the handler


@pytest.mark.anyio
async def test_future_cancelled_during_compute_does_not_break_the_batch(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2)
    async with running(batcher):
        a, b = submit_all(batcher, [1, 2])
        assert await handler.started.get() == [1, 2]
        a.cancel()  # the client went away mid-compute: no InvalidStateError when results come
        handler.gate.set()
        assert await results([b]) == [4]
        assert await results(submit_all(batcher, [3, 4])) == [6, 8]  # and the batcher keeps going
    assert a.cancelled()


@pytest.mark.anyio
async def test_future_cancelled_during_compute_frees_its_slot_at_once(gated: GatedFactory) -> None:
    # Issue 10, row 13: a request that timed out mid-compute must not hold its slot until the
    # batch ends, or a deadline storm refuses clients that would fit.
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2, queue_limit=2)
    async with running(batcher):
        a, b = submit_all(batcher, [1, 2])
        assert await handler.started.get() == [1, 2]
        assert batcher.available == 0
        a.cancel()
        await asyncio.sleep(0)  # one loop turn: the done-callback runs
        assert batcher.available == 1
        a.cancel()  # idempotent: nothing freed twice
        await asyncio.sleep(0)
        assert batcher.available == 1
        handler.gate.set()
        assert await results([b]) == [4]
    assert batcher.available == batcher.queue_limit


# -- handler failures -------------------------------------------------------------------------


def fail_on_negative(items: Sequence[int]) -> list[int]:
    if any(x < 0 for x in items):
        raise ValueError("negative input")
    return double(items)


@pytest.mark.anyio
async def test_handler_exception_fails_only_its_own_batch() -> None:
    observer = RecordingObserver()
    batcher = make_batcher(fail_on_negative, max_batch_size=2, observer=observer)
    async with running(batcher):
        bad = submit_all(batcher, [-1, 5])
        good = submit_all(batcher, [6, 7])
        for future in bad:
            with pytest.raises(ValueError, match="negative input"):
                await future
        assert await results(good) == [12, 14]
        assert await results(submit_all(batcher, [8, 9])) == [16, 18]
    errors = [error for _, _, _, error in observer.ends]
    assert isinstance(errors[0], ValueError)
    assert errors[1:] == [None, None]


@pytest.mark.anyio
async def test_wrong_number_of_results_fails_the_batch_with_a_clear_error() -> None:
    def drop_last(items: Sequence[int]) -> list[int]:
        return double(items)[:-1] if items[0] == 1 else double(items)

    batcher = make_batcher(drop_last, max_batch_size=3)
    async with running(batcher):
        for future in submit_all(batcher, [1, 2, 3]):
            with pytest.raises(HandlerResultError, match="returned 2 result"):
                await future
        assert await results(submit_all(batcher, [4, 5, 6])) == [8, 10, 12]


@pytest.mark.anyio
async def test_handler_raising_stop_iteration_still_fails_the_futures() -> None:
    def stop(items: Sequence[int]) -> list[int]:
        raise StopIteration

    batcher = make_batcher(stop, max_batch_size=1, queue_limit=4)
    async with running(batcher):
        (future,) = submit_all(batcher, [1])
        with pytest.raises(RuntimeError, match="StopIteration"):
            await future


# -- stop -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stop_drains_queued_and_in_flight_work(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2, max_in_flight_batches=2)
    async with running(batcher):
        first = submit_all(batcher, [1, 2])
        assert await handler.started.get() == [1, 2]
        # A partial batch with an hour of delay left and a free compute slot: only the drain
        # dispatches it.
        (third,) = submit_all(batcher, [3])
        stopping = asyncio.create_task(batcher.stop(drain_timeout_s=SAFETY_S))
        assert await handler.started.get() == [3]
        assert not stopping.done()  # batch 1 is still blocked in compute
        with pytest.raises(BatcherStopped):
            batcher.reserve(1)
        handler.gate.set()
        await stopping
        assert await results(first) == [2, 4]
        assert await results([third]) == [6]
        assert not batcher.running


@pytest.mark.anyio
async def test_stop_fails_what_is_left_after_the_drain_timeout() -> None:
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    started: asyncio.Queue[list[int]] = asyncio.Queue()

    def never_finishes(items: Sequence[int]) -> list[int]:
        loop.call_soon_threadsafe(started.put_nowait, list(items))
        gate.wait()
        return double(items)

    # An injected executor, so the test can wait for the stuck thread after opening the gate.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    try:
        batcher = make_batcher(never_finishes, max_batch_size=2, executor=executor)
        await batcher.start()
        in_compute = submit_all(batcher, [1, 2])
        assert await started.get() == [1, 2]
        queued = submit_all(batcher, [3])
        async with asyncio.timeout(SAFETY_S):
            await batcher.stop(drain_timeout_s=0.01)
        for future in in_compute + queued:
            with pytest.raises(BatcherStopped):
                await future
        assert batcher.available == batcher.queue_limit
        # An injected executor belongs to the caller: still usable (its second thread is free).
        assert await asyncio.wrap_future(executor.submit(int, "7")) == 7
    finally:
        gate.set()
        await asyncio.to_thread(executor.shutdown, wait=True)


@pytest.mark.anyio
async def test_reserve_and_submit_after_stop_raise_batcher_stopped() -> None:
    batcher = make_batcher(double, max_batch_size=2, queue_limit=4)
    await batcher.start()
    early = batcher.reserve(2)
    await batcher.stop(drain_timeout_s=0)
    await batcher.stop()  # idempotent
    with pytest.raises(BatcherStopped):
        batcher.reserve(1)
    with pytest.raises(BatcherStopped):
        early.submit(1)
    early.release()
    assert batcher.available == batcher.queue_limit
    with pytest.raises(RuntimeError):
        await batcher.start()


@pytest.mark.anyio
async def test_stop_waits_for_outstanding_reservations() -> None:
    batcher = make_batcher(double, max_batch_size=4, queue_limit=4)
    async with running(batcher):
        reservation = batcher.reserve(2)  # a request still decoding its files when stop() begins
        (queued,) = submit_all(batcher, [1])
        stopping = asyncio.create_task(batcher.stop(drain_timeout_s=SAFETY_S))
        # Only the drain dispatches a partial batch with an hour of delay left, so once this
        # result is in, stop() is draining, and it cannot finish while slots are reserved.
        assert await results([queued]) == [2]
        assert not stopping.done()
        future = reservation.submit(5)
        reservation.release()  # its second file failed to decode
        await stopping
        assert await results([future]) == [10]


@pytest.mark.anyio
async def test_stop_before_start_fails_queued_items() -> None:
    batcher = make_batcher(double, max_batch_size=4, queue_limit=4)
    (future,) = submit_all(batcher, [1])
    await batcher.stop()
    with pytest.raises(BatcherStopped):
        await future


# -- the bound --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reservations_are_all_or_nothing_and_release_returns_slots() -> None:
    batcher = make_batcher(double, max_batch_size=4, queue_limit=4)
    async with running(batcher):
        three = batcher.reserve(3)
        assert (batcher.available, batcher.reserved) == (1, 3)
        with pytest.raises(QueueFull) as full:
            batcher.reserve(2)
        assert (full.value.requested, full.value.available, full.value.queue_limit) == (2, 1, 4)
        assert batcher.available == 1  # the failed reservation took nothing
        three.release()
        three.release()  # idempotent
        assert batcher.available == 4
        with pytest.raises(QueueFull):
            batcher.reserve(5)  # can never fit
        with batcher.reserve(4) as four:
            assert batcher.available == 0
            with pytest.raises(QueueFull):
                batcher.reserve(1)
            futures = [four.submit(x) for x in (1, 2, 3)]
        assert four.remaining == 0
        assert batcher.available == 1  # the unused slot came back; three items still queued
        with pytest.raises(ValueError, match="negative"):
            batcher.reserve(-1)
        with batcher.reserve(1) as one:
            futures.append(one.submit(4))  # fills the batch of four
            with pytest.raises(RuntimeError, match="no slot left"):
                one.submit(5)
        assert await results(futures) == [2, 4, 6, 8]
        assert batcher.available == 4


@pytest.mark.anyio
async def test_items_in_compute_count_against_the_bound(gated: GatedFactory) -> None:
    handler = gated(double)
    batcher = make_batcher(handler, max_batch_size=2, queue_limit=3)
    async with running(batcher):
        futures = submit_all(batcher, [1, 2])
        assert await handler.started.get() == [1, 2]
        assert (batcher.queue_depth, batcher.available) == (0, 1)
        with pytest.raises(QueueFull):
            batcher.reserve(2)
        handler.gate.set()
        assert await results(futures) == [2, 4]
        assert batcher.available == 3


# -- observer ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_observer_sees_queue_batches_and_in_flight() -> None:
    observer = RecordingObserver()
    batcher = make_batcher(fail_on_negative, max_batch_size=2, queue_limit=8, observer=observer)
    async with running(batcher):
        good = submit_all(batcher, [1, 2])
        bad = submit_all(batcher, [-3, 4])
        await results(good)
        await asyncio.gather(*bad, return_exceptions=True)
    assert observer.depths[:4] == [1, 2, 3, 4]  # one call per submitted item
    assert observer.depths[-1] == 0
    assert [(batch_id, size, len(waits)) for batch_id, size, waits in observer.starts] == [(1, 2, 2), (2, 2, 2)]
    assert all(wait >= 0 for _, _, waits in observer.starts for wait in waits)
    assert [(batch_id, size) for batch_id, size, _, _ in observer.ends] == [(1, 2), (2, 2)]
    assert observer.ends[0][3] is None
    assert isinstance(observer.ends[1][3], ValueError)
    assert all(duration >= 0 for _, _, duration, _ in observer.ends)
    assert observer.in_flight == [1, 0, 1, 0]
    assert observer.dropped == []


@pytest.mark.anyio
async def test_a_failing_observer_loses_no_result(caplog: pytest.LogCaptureFixture) -> None:
    batcher = make_batcher(double, max_batch_size=2, queue_limit=8, observer=BrokenObserver())
    async with running(batcher):
        assert await results(submit_all(batcher, [1, 2])) == [2, 4]
    assert "batch observer failed" in caplog.text


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_delay_s": -1.0},
        {"queue_limit": 0},
        {"max_in_flight_batches": 0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_batcher(double, **kwargs)


# -- dispatch when nothing more is on its way ---------------------------------------------------


@pytest.mark.anyio
async def test_lone_item_goes_at_once_when_no_reservation_is_open() -> None:
    handler = Recording(double)
    batcher = make_batcher(handler, max_batch_size=8, dispatch_when_idle=True)
    await batcher.start()
    try:
        with batcher.reserve(1) as r:
            fut = r.submit(21)
        async with asyncio.timeout(SAFETY_S):  # an hour of delay: finishing proves it was not waited
            result, info = await fut
        assert result == 42
        assert info.size == 1
    finally:
        await batcher.stop()


@pytest.mark.anyio
async def test_batch_waits_for_items_still_on_their_way() -> None:
    handler = Recording(double)
    batcher = make_batcher(handler, max_batch_size=8, dispatch_when_idle=True)
    await batcher.start()
    try:
        decoding = batcher.reserve(2)  # another request, admitted and still decoding
        with batcher.reserve(1) as r:
            first = r.submit(1)
        for _ in range(10):  # yield to the loop so the dispatcher sees the item (scheduling, not timing)
            await asyncio.sleep(0)
        assert not first.done()
        assert batcher.queue_depth == 1  # held: two more items are on their way
        second = decoding.submit(2)
        decoding.release()  # its other file failed to decode: nothing else is coming
        async with asyncio.timeout(SAFETY_S):
            (r1, i1), (r2, i2) = await asyncio.gather(first, second)
        assert (r1, r2) == (2, 4)
        assert i1.batch_id == i2.batch_id
        assert i1.size == 2
        assert handler.batches == [[1, 2]]
    finally:
        await batcher.stop()
