"""A bounded asyncio micro-batcher: many single requests in, few batched handler calls out.

Standard library only, generic over item ``T`` and result ``R``; handler, executor and observer
are injected. The contract (docs/batching.md explains the why):

* ``reserve(n)`` takes ``n`` of ``queue_limit`` slots at once, or none (``QueueFull``;
  ``BatcherStopped`` once stopping). No awaits: callers admit a request before reading it.
  ``reserve(n, low_priority=True)`` (slide jobs) queues in a second lane: a batch takes every
  queued normal item first and fills up with low-priority ones, so background work never
  makes an interactive request wait behind it (it still shares the slots and batches).
* ``Reservation.submit(item)`` queues one reserved item; its future resolves to
  ``(result, BatchInfo)`` or to the batch's error. ``release()`` returns unsubmitted slots.
* A slot is held until the item's batch has finished computing, so ``queue_limit`` bounds all
  admitted, unanswered work. When a batch goes is decided by ``dispatch_delay`` alone.
* A future cancelled while queued never reaches the handler; one cancelled while its batch
  computes gives its slot back at once (its item is abandoned with the batch's result). ``stop()`` refuses new work,
  drains for up to ``drain_timeout_s`` and then fails what is left with ``BatcherStopped``.
* Every public method is called on the event loop that ran ``start()``; only the handler
  runs in the executor.
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
from types import TracebackType
from typing import Generic, Protocol, TypeVar

__all__ = [
    "BatchInfo",
    "BatchObserver",
    "Batcher",
    "BatcherStopped",
    "HandlerResultError",
    "NullObserver",
    "QueueFull",
    "Reservation",
    "dispatch_delay",
]

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Fewer free slots than requested; raised by `Batcher.reserve` before any work is done."""

    def __init__(self, requested: int, available: int, queue_limit: int) -> None:
        super().__init__(f"batch queue full: {requested} slot(s) requested, {available} of {queue_limit} free")
        self.requested = requested
        self.available = available
        self.queue_limit = queue_limit


class BatcherStopped(Exception):
    """The batcher is stopping or stopped: raised by `reserve`/`submit`, set on abandoned futures."""


class HandlerResultError(RuntimeError):
    """The handler returned a number of results different from the number of items it got."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"batch handler returned {got} result(s) for {expected} item(s)")
        self.expected = expected
        self.got = got


class BatchObserver(Protocol):
    """Receives the batcher's statistics (metrics plug in here). Called on the event loop thread.

    An observer that raises is logged and otherwise ignored: metrics must never lose a request.
    """

    def on_queue_depth(self, depth: int) -> None:
        """Submitted items waiting to be dispatched (reservations are not included)."""

    def on_batch_start(self, batch_id: int, size: int, queue_waits_s: Sequence[float]) -> None:
        """A batch was dispatched; `queue_waits_s` holds each item's time from submit to dispatch."""

    def on_batch_end(self, batch_id: int, size: int, duration_s: float, error: BaseException | None) -> None:
        """A batch finished: `duration_s` is the handler's run time; `error` is None on success."""

    def on_in_flight(self, batches: int) -> None:
        """Number of batches currently computing."""

    def on_dropped_cancelled(self, count: int) -> None:
        """`count` queued items were dropped before compute because their futures were cancelled."""


class NullObserver:
    """The default observer: ignores everything."""

    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_batch_start(self, batch_id: int, size: int, queue_waits_s: Sequence[float]) -> None:
        pass

    def on_batch_end(self, batch_id: int, size: int, duration_s: float, error: BaseException | None) -> None:
        pass

    def on_in_flight(self, batches: int) -> None:
        pass

    def on_dropped_cancelled(self, count: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """How one item was served; attached to its result for logs and Server-Timing."""

    batch_id: int
    size: int
    queue_wait_s: float  # from submit() to dispatch
    compute_s: float  # the handler call for the whole batch


def dispatch_delay(
    *,
    queued: int,
    oldest_wait_s: float,
    on_their_way: int,
    max_batch_size: int,
    max_batch_delay_s: float,
    dispatch_when_idle: bool,
    draining: bool,
) -> float:
    """The batch rule: seconds until the queued items should go as a batch (0.0: now).

    A batch goes when it is full, when its oldest item has waited `max_batch_delay_s`, when
    the batcher drains, or (`dispatch_when_idle`) when no admitted item is still on its way:
    waiting can then not fill it, so it would only add latency.
    """
    if queued >= max_batch_size or draining or (dispatch_when_idle and on_their_way == 0):
        return 0.0
    return max(0.0, max_batch_delay_s - oldest_wait_s)


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


class _Slots:
    """The `queue_limit` bound: reserved + queued + computing items, in one count."""

    def __init__(self, limit: int, on_change: Callable[[], None]) -> None:
        self.limit = limit
        self.used = 0
        self.reserved = 0  # taken by reserve(), not yet submitted
        self.draining = False
        self.drained = asyncio.Event()  # set while draining once no slot is used
        self._on_change = on_change

    @property
    def available(self) -> int:
        return self.limit - self.used

    def reserve(self, n: int) -> None:
        if n > self.available:
            raise QueueFull(n, self.available, self.limit)
        self.used += n
        self.reserved += n

    def submitted(self) -> None:
        """One reserved slot now holds a queued item (or is freed right after, if closed)."""
        self.reserved -= 1

    def unreserve(self, n: int) -> None:
        """`n` reserved slots will never be submitted: fewer items on their way."""
        self.reserved -= n
        self.free(n)
        self._on_change()

    def free(self, n: int) -> None:
        self.used -= n
        if self.draining and self.used == 0:
            self.drained.set()

    def start_draining(self) -> None:
        self.draining = True
        if self.used == 0:
            self.drained.set()


@dataclass(eq=False, slots=True)
class _Entry(Generic[T, R]):
    seq: int
    item: T
    future: asyncio.Future[tuple[R, BatchInfo]]
    enqueued_at: float  # loop.time()
    low: bool = False  # queued in the low-priority lane
    state: _State = _State.QUEUED
    holds_slot: bool = True  # False once its slot was given back (cancelled mid-compute, or finished)


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


class Reservation(Generic[T, R]):
    """`n` slots of a batcher's bound, held until submitted or released."""

    def __init__(
        self,
        slots: _Slots,
        enqueue: Callable[[T, bool], asyncio.Future[tuple[R, BatchInfo]]],
        n: int,
        low_priority: bool = False,
    ) -> None:
        self._slots = slots
        self._enqueue = enqueue
        self._remaining = n
        self._low = low_priority

    @property
    def remaining(self) -> int:
        """Slots still reserved (not yet submitted or released)."""
        return self._remaining

    def submit(self, item: T) -> asyncio.Future[tuple[R, BatchInfo]]:
        """Queue `item` in one reserved slot; the future resolves to `(result, BatchInfo)`.

        Raises RuntimeError when no reserved slot is left, and BatcherStopped once the batcher
        has shut down (the slot is given back).
        """
        if self._remaining <= 0:
            raise RuntimeError("reservation has no slot left: reserve one slot per item")
        self._remaining -= 1
        self._slots.submitted()
        return self._enqueue(item, self._low)

    def release(self) -> None:
        """Give back the slots that were not submitted. Idempotent."""
        if self._remaining:
            n, self._remaining = self._remaining, 0
            self._slots.unreserve(n)

    def __enter__(self) -> Reservation[T, R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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
        self._slots = _Slots(queue_limit, on_change=self._wakeup.set)
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
        """Submitted items waiting for dispatch (both lanes)."""
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
        return Reservation(self._slots, self._enqueue, n, low_priority)

    def _queued(self) -> int:
        return len(self._queue) + len(self._low_queue)

    def _enqueue(self, item: T, low: bool = False) -> asyncio.Future[tuple[R, BatchInfo]]:
        if self._phase is _Phase.CLOSED:
            self._slots.free(1)
            raise BatcherStopped("batcher is stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[R, BatchInfo]] = loop.create_future()
        entry: _Entry[T, R] = _Entry(next(self._seq), item, future, loop.time(), low)
        (self._low_queue if low else self._queue)[entry.seq] = entry
        future.add_done_callback(partial(self._on_future_done, entry))
        self._observe(lambda: self._observer.on_queue_depth(self._queued()))
        self._wakeup.set()
        return future

    def _on_future_done(self, entry: _Entry[T, R], future: asyncio.Future[tuple[R, BatchInfo]]) -> None:
        # Fires for every completion; only a cancellation needs action.
        if not future.cancelled():
            return
        if entry.state is _State.QUEUED:
            self._drop([entry])
        elif entry.state is _State.DISPATCHED and entry.holds_slot:
            # Cancelled mid-compute (deadline, client gone): its slot goes back now, not when the
            # batch ends, so a deadline storm does not turn into needless 503s. The abandoned item
            # stays in memory until its batch ends: at most max_in_flight_batches x max_batch_size.
            entry.holds_slot = False
            self._slots.free(1)
            self._wakeup.set()

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
        for entry in entries:
            entry.state = _State.DROPPED
            if not entry.future.done():
                entry.future.set_exception(error)
        if entries:
            self._slots.free(len(entries))
            self._observe(lambda: self._observer.on_queue_depth(0))

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
            # Cancelled but its done-callback has not run yet: drop it here.
            (cancelled if entry.future.done() else entries).append(entry)
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
        size = len(batch.entries)
        if error is None and results is not None:
            for entry, result in zip(batch.entries, results, strict=True):
                if not entry.future.done():  # the client may have gone away during compute
                    wait = batch.dispatched_at - entry.enqueued_at
                    info = BatchInfo(batch.batch_id, size, wait, duration_s)
                    entry.future.set_result((result, info))
        else:
            failure = error if error is not None else RuntimeError("batch finished without results")
            for entry in batch.entries:
                if not entry.future.done():
                    entry.future.set_exception(failure)
        self._in_flight -= 1
        held = sum(entry.holds_slot for entry in batch.entries)
        for entry in batch.entries:
            entry.holds_slot = False
        self._slots.free(held)
        self._observe(lambda: self._observer.on_batch_end(batch.batch_id, size, duration_s, error))
        self._observe(lambda: self._observer.on_in_flight(self._in_flight))
        self._wakeup.set()  # a compute slot is free

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
