"""A bounded asyncio micro-batcher: many single requests in, few batched handler calls out.

Standard library only, generic over item ``T`` and result ``R``; handler, executor and observer
are injected. ``reserve(n)`` takes ``n`` of ``queue_limit`` slots or none, ``Reservation.submit``
queues one item for a future of ``(result, BatchInfo)``, and a slot is held until its batch has
computed. When a batch goes is the pure rule in `service.core.batch_rule`; the full contract
(cancellation, draining, threads) is in docs/batching.md. ``reserve(n, low_priority=True)``
(slide jobs) queues in a second lane: a batch takes every queued normal item first and fills up
with low-priority ones, so background work never makes an interactive request wait behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from service.core.batch_rule import dispatch_delay
from service.core.batch_slots import OnDone, Reservation, Slots
from service.core.batch_types import (
    BatcherStopped,
    BatchInfo,
    BatchObserver,
    HandlerResultError,
    NullObserver,
    QueueFull,
    SharedBound,
)

__all__ = [
    "BatchInfo",
    "BatchObserver",
    "Batcher",
    "BatcherStopped",
    "HandlerResultError",
    "NullObserver",
    "OnDone",
    "QueueFull",
    "Reservation",
    "SharedBound",
    "dispatch_delay",
]

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class _State(enum.Enum):
    QUEUED = enum.auto()
    DISPATCHED = enum.auto()
    DROPPED = enum.auto()


class _Phase(enum.Enum):
    NEW = enum.auto()  # not started
    RUNNING = enum.auto()  # reserve() accepts work
    FAILED = enum.auto()  # the dispatcher crashed: reserve() refuses, stop() still cleans up
    DRAINING = enum.auto()  # stop() called: reserve() refuses; queued items go without delay
    CLOSED = enum.auto()  # shut down: nothing runs any more, submit() refuses


class _Entry(asyncio.Future[tuple[R, BatchInfo]], Generic[T, R]):
    """One submitted item: its queue entry and the future `submit` returns, in one object.

    Its cancellation reaches the batcher inside `cancel()` itself, not through a done-callback:
    a callback per item would cost a scheduled loop callback for every result as well. One
    object, not an entry beside its future, so no reference cycle outlives the item.
    """

    __slots__ = ("batcher", "enqueued_at", "holds_slot", "item", "low", "on_done", "seq", "state")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        batcher: Batcher[T, R],
        seq: int,
        item: T,
        enqueued_at: float,  # loop.time()
        low: bool,
        on_done: OnDone[R] | None,
    ) -> None:
        super().__init__(loop=loop)
        self.batcher = batcher
        self.seq = seq
        self.item = item
        self.enqueued_at = enqueued_at
        self.low = low  # queued in the low-priority lane
        self.on_done = on_done  # told at once when the future settles (Reservation.submit)
        self.state = _State.QUEUED
        self.holds_slot = True  # False once its slot was given back (cancelled mid-compute, or finished)

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self.batcher._on_cancelled(self)
        return True


@dataclass(eq=False, slots=True)
class _Batch(Generic[T, R]):
    batch_id: int
    entries: list[_Entry[T, R]]
    dispatched_at: float
    finished: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome(Generic[R]):
    results: list[R] | None
    error: Exception | None
    duration_s: float


def _call_handler(handler: Callable[[Sequence[T]], Sequence[R]], items: list[T]) -> _Outcome[R]:
    """Runs in the executor thread: time the handler and turn its exception into a value.

    Returning the exception (instead of raising) keeps the timing for failed batches too, and
    materialising the results with list() here keeps that work off the event loop.
    """
    started = time.perf_counter()
    try:
        results = list(handler(items))
    except Exception as exc:
        return _Outcome(None, exc, time.perf_counter() - started)
    return _Outcome(results, None, time.perf_counter() - started)


class Batcher(Generic[T, R]):
    """Groups submitted items into batches for a synchronous handler run in an executor."""

    def __init__(
        self,
        handler: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        queue_limit: int,
        max_in_flight_batches: int = 1,
        executor: concurrent.futures.Executor | None = None,
        observer: BatchObserver | None = None,
        dispatch_when_idle: bool = True,
        shared_bound: SharedBound | None = None,
    ) -> None:
        for name, value, least in (
            ("max_batch_size", max_batch_size, 1),
            ("max_batch_delay_s", max_batch_delay_s, 0),
            ("queue_limit", queue_limit, 1),
            ("max_in_flight_batches", max_in_flight_batches, 1),
        ):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self._handler = handler
        self._max_batch_size = max_batch_size
        self._max_batch_delay_s = max_batch_delay_s
        self._max_in_flight_batches = max_in_flight_batches
        self._dispatch_when_idle = dispatch_when_idle
        self._observer: BatchObserver = observer if observer is not None else NullObserver()
        # An injected executor belongs to the caller; one we create is ours to shut down.
        self._executor = executor
        self._owns_executor = executor is None

        self._wakeup = asyncio.Event()  # any change the dispatcher may care about
        # `shared_bound`: queue_limit also holds across other batchers (the fronts of a server).
        self._slots = Slots(queue_limit, on_change=self._wakeup.set, shared=shared_bound)
        # OrderedDict keyed by sequence number: FIFO order, O(1) removal of a cancelled entry.
        self._queue: OrderedDict[int, _Entry[T, R]] = OrderedDict()
        self._low_queue: OrderedDict[int, _Entry[T, R]] = OrderedDict()  # the low-priority lane
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._in_flight = 0
        self._active: dict[int, _Batch[T, R]] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._phase = _Phase.NEW

    # -- public state -----------------------------------------------------------------------

    @property
    def queue_limit(self) -> int:
        """The bound, in items."""
        return self._slots.limit

    @property
    def available(self) -> int:
        """Free slots: how many items `reserve` would accept right now."""
        return self._slots.available

    @property
    def queue_depth(self) -> int:
        """Submitted items waiting for dispatch."""
        return self._queued()

    @property
    def reserved(self) -> int:
        """Slots reserved but not yet submitted."""
        return self._slots.reserved

    @property
    def in_flight(self) -> int:
        """Batches currently computing."""
        return self._in_flight

    @property
    def running(self) -> bool:
        """Started and not stopping: `reserve` accepts work."""
        return self._phase is _Phase.RUNNING

    @property
    def _refusing(self) -> bool:
        return self._phase in (_Phase.FAILED, _Phase.DRAINING, _Phase.CLOSED)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher (and the worker threads, unless an executor was injected)."""
        if self._phase is not _Phase.NEW:
            raise RuntimeError("a Batcher can be started only once")
        self._phase = _Phase.RUNNING
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._max_in_flight_batches, thread_name_prefix="batcher"
            )
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop(), name="batcher")
        self._dispatcher.add_done_callback(self._on_dispatcher_done)

    async def stop(self, drain_timeout_s: float | None = 30.0) -> None:
        """Stop accepting, drain for up to `drain_timeout_s` (None: no limit), then fail the rest.

        Idempotent; a concurrent second call waits for the first to finish.
        """
        if self._phase in (_Phase.DRAINING, _Phase.CLOSED):
            await self._stopped.wait()
            return
        started = self._phase is not _Phase.NEW
        self._phase = _Phase.DRAINING
        self._wakeup.set()  # the dispatcher must stop waiting for delays
        try:
            if started and (drain_timeout_s is None or drain_timeout_s > 0):
                self._slots.start_draining()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slots.drained.wait(), drain_timeout_s)
        finally:
            # Also runs if the caller is cancelled mid-drain: nothing may stay pending.
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._phase = _Phase.CLOSED
        tasks: list[asyncio.Task[None]] = list(self._batch_tasks)
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A batch task cancelled before its first step never ran its own cleanup.
        for batch in list(self._active.values()):
            self._finish_batch(batch, None, BatcherStopped("batcher stopped before the batch finished"), 0.0)
        self._fail_queued(BatcherStopped("batcher stopped before the item was dispatched"))
        if self._owns_executor and self._executor is not None:
            # wait=False: a handler stuck in its thread must not hang shutdown.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    # -- reservations -----------------------------------------------------------------------

    def reserve(self, n: int, *, low_priority: bool = False) -> Reservation[T, R]:
        """Reserve `n` slots at once, or none: raises QueueFull / BatcherStopped. No awaits.

        `low_priority`: the items go to the low lane (dispatched only after every normal one).
        """
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of slots ({n})")
        if self._refusing:
            raise BatcherStopped("batcher is stopping")
        self._slots.reserve(n)
        return Reservation(self._slots, partial(self._enqueue, low=low_priority), n)

    def _queued(self) -> int:
        return len(self._queue) + len(self._low_queue)

    def _enqueue(
        self, items: Sequence[T], on_done: OnDone[R] | None = None, low: bool = False
    ) -> list[asyncio.Future[tuple[R, BatchInfo]]]:
        """Queue items (one `submit`, or a `submit_all`): one observer call and wake-up for all."""
        if self._phase is _Phase.CLOSED:
            self._slots.free(len(items))
            raise BatcherStopped("batcher is stopped")
        loop = asyncio.get_running_loop()
        now = loop.time()
        queue = self._low_queue if low else self._queue
        seq = self._seq
        entries: list[asyncio.Future[tuple[R, BatchInfo]]] = []
        for item in items:
            entry = _Entry(loop, self, next(seq), item, now, low, on_done)
            queue[entry.seq] = entry
            entries.append(entry)
        try:  # without _observe's closure: this runs for every submitted item
            self._observer.on_queue_depth(len(self._queue) + len(self._low_queue))
        except Exception:
            logger.exception("batch observer failed")
        self._wakeup.set()
        return entries

    def _on_cancelled(self, entry: _Entry[T, R]) -> None:
        """Its future was just cancelled (inside `cancel()`, on the loop thread)."""
        if entry.state is _State.QUEUED:
            self._drop([entry])
        elif entry.state is _State.DISPATCHED and entry.holds_slot:
            # Cancelled mid-compute (deadline, client gone): its slot goes back now, not when the
            # batch ends, so a deadline storm does not turn into needless 503s. The abandoned item
            # stays in memory until its batch ends: at most max_in_flight_batches x max_batch_size.
            entry.holds_slot = False
            self._slots.free(1)
            self._wakeup.set()
        self._tell([entry])

    def _tell(self, entries: list[_Entry[T, R]]) -> None:
        """Run the `on_done` of entries whose futures have just settled (after the bookkeeping:
        the caller's code sees the slots already free)."""
        for entry in entries:
            if entry.on_done is not None:
                try:
                    entry.on_done(entry)
                except Exception:
                    logger.exception("an item's on_done failed")

    def _drop(self, entries: list[_Entry[T, R]]) -> None:
        """Remove queued entries whose futures were cancelled and give their slots back."""
        for entry in entries:
            entry.state = _State.DROPPED
            (self._low_queue if entry.low else self._queue).pop(entry.seq, None)
        self._slots.free(len(entries))
        self._observe(lambda: self._observer.on_dropped_cancelled(len(entries)))
        self._observe(lambda: self._observer.on_queue_depth(self._queued()))
        self._wakeup.set()  # the oldest item may have changed, and with it the deadline

    def _fail_queued(self, error: BaseException) -> None:
        entries = [*self._queue.values(), *self._low_queue.values()]
        self._queue.clear()
        self._low_queue.clear()
        settled: list[_Entry[T, R]] = []
        for entry in entries:
            entry.state = _State.DROPPED
            if not entry.done():
                entry.set_exception(error)
                settled.append(entry)
        if entries:
            self._slots.free(len(entries))
            self._observe(lambda: self._observer.on_queue_depth(0))
        self._tell(settled)

    # -- dispatching ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before looking at the state: any change after this point sets it again,
            # so no wake-up is lost (everything here runs on the loop thread, without awaits).
            self._wakeup.clear()
            wake_at: float | None = None
            while self._queued() and self._in_flight < self._max_in_flight_batches:
                # The next batch starts with the normal lane, so its oldest item sets the clock.
                oldest = next(iter((self._queue or self._low_queue).values()))
                now = loop.time()
                # The delay counts from the oldest item's arrival, so items that already waited
                # behind a busy handler go as soon as a compute slot frees up.
                delay = dispatch_delay(
                    queued=self._queued(),
                    oldest_wait_s=now - oldest.enqueued_at,
                    on_their_way=self._slots.reserved,
                    max_batch_size=self._max_batch_size,
                    max_batch_delay_s=self._max_batch_delay_s,
                    dispatch_when_idle=self._dispatch_when_idle,
                    draining=self._refusing,
                )
                if delay > 0:
                    wake_at = oldest.enqueued_at + self._max_batch_delay_s
                    break
                self._dispatch(loop)
            if wake_at is None:
                await self._wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(wake_at):
                        await self._wakeup.wait()

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take up to max_batch_size live entries from the queue and start computing them."""
        entries: list[_Entry[T, R]] = []
        cancelled: list[_Entry[T, R]] = []
        while self._queued() and len(entries) < self._max_batch_size:
            # Normal items first; low-priority ones only fill what is left of the batch.
            _, entry = (self._queue or self._low_queue).popitem(last=False)
            # Defensive: a cancelled entry leaves the queue inside cancel() (`_on_cancelled`).
            (cancelled if entry.done() else entries).append(entry)
        if cancelled:
            self._drop(cancelled)
        self._observe(lambda: self._observer.on_queue_depth(self._queued()))
        if not entries:
            return
        now = loop.time()
        for entry in entries:
            entry.state = _State.DISPATCHED
        batch = _Batch(next(self._batch_ids), entries, now)
        self._active[batch.batch_id] = batch
        self._in_flight += 1
        waits = [now - e.enqueued_at for e in entries]
        self._observe(lambda: self._observer.on_batch_start(batch.batch_id, len(entries), waits))
        self._observe(lambda: self._observer.on_in_flight(self._in_flight))
        task = loop.create_task(self._run_batch(batch), name=f"batcher-batch-{batch.batch_id}")
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _run_batch(self, batch: _Batch[T, R]) -> None:
        loop = asyncio.get_running_loop()
        items = [entry.item for entry in batch.entries]
        try:
            outcome = await loop.run_in_executor(self._executor, _call_handler, self._handler, items)
        except asyncio.CancelledError:
            # Only stop() cancels us; the thread may still be running, its result is discarded.
            stopped = BatcherStopped("batcher stopped before the batch finished")
            self._finish_batch(batch, None, stopped, loop.time() - batch.dispatched_at)
            raise
        except Exception as exc:  # e.g. the executor refused the work; still this batch only
            self._finish_batch(batch, None, exc, loop.time() - batch.dispatched_at)
            return
        error: Exception | None = outcome.error
        results = outcome.results
        if error is None and results is not None and len(results) != len(items):
            error = HandlerResultError(len(items), len(results))
        if isinstance(error, StopIteration):
            # Future.set_exception refuses StopIteration (it would break generators).
            wrapped = RuntimeError(f"batch handler raised StopIteration: {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        self._finish_batch(batch, results if error is None else None, error, outcome.duration_s)

    def _finish_batch(
        self,
        batch: _Batch[T, R],
        results: list[R] | None,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        """Complete every still-pending future of the batch, once, and free its slots."""
        if batch.finished:
            return
        batch.finished = True
        del self._active[batch.batch_id]
        entries = batch.entries
        size = len(entries)
        settled: list[_Entry[T, R]] = []  # the ones this call completed (not cancelled before)
        if error is None and results is not None:
            batch_id, dispatched_at = batch.batch_id, batch.dispatched_at
            for entry, result in zip(entries, results, strict=True):
                if not entry.done():  # the client may have gone away during compute
                    info = BatchInfo(batch_id, size, dispatched_at - entry.enqueued_at, duration_s)
                    entry.set_result((result, info))
                    settled.append(entry)
        else:
            failure = error if error is not None else RuntimeError("batch finished without results")
            for entry in entries:
                if not entry.done():
                    entry.set_exception(failure)
                    settled.append(entry)
        self._in_flight -= 1
        held = 0
        for entry in entries:
            held += entry.holds_slot
            entry.holds_slot = False
        self._slots.free(held)
        self._observe(lambda: self._observer.on_batch_end(batch.batch_id, size, duration_s, error))
        self._observe(lambda: self._observer.on_in_flight(self._in_flight))
        self._wakeup.set()  # a compute slot is free
        self._tell(settled)

    def _on_dispatcher_done(self, task: asyncio.Task[None]) -> None:
        # The loop only ends by cancellation; anything else is a bug. Fail the queue rather than
        # leave its futures pending until stop(), and refuse new work.
        if task.cancelled() or task.exception() is None:
            return
        logger.error("batch dispatcher crashed", exc_info=task.exception())
        if self._phase is _Phase.RUNNING:
            self._phase = _Phase.FAILED
        self._fail_queued(BatcherStopped("batch dispatcher crashed"))

    def _observe(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            logger.exception("batch observer failed")
