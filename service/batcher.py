"""A bounded asyncio micro-batcher: many single requests in, few batched handler calls out.

Standard library only and generic over the item type ``T`` and result type ``R``: the handler,
the executor and the metrics observer are injected, so this module knows nothing about ONNX
Runtime, NumPy, FastAPI or Prometheus, and unit tests drive it with plain fakes.

Flow
----
1. ``reserve(n)`` takes ``n`` slots of the bound synchronously (no awaits) or raises ``QueueFull``
   (``BatcherStopped`` once stopping). The HTTP layer calls it *before* reading or decoding
   anything, so an overloaded server answers 503 cheaply, and ``/predict-many`` gets all of its
   N slots or none (all-or-nothing: a failed ``reserve`` takes nothing).
2. ``Reservation.submit(item)`` turns one reserved slot into a queued item and returns a future
   that resolves to ``(result, BatchInfo)``. ``Reservation.release()`` (or leaving its ``with``
   block) gives back the slots that were never submitted, e.g. for a file that failed to decode.
3. One dispatcher task forms batches. A batch is dispatched when ``max_batch_size`` items are
   waiting, or when ``max_delay_s`` has passed since the oldest waiting item arrived, or
   (``dispatch_when_idle``, the default) as soon as no reservation is open, i.e. no admitted
   item is still on its way, provided fewer than ``max_in_flight`` batches are computing. The
   third rule never makes a batch wait longer; it removes the delay when waiting cannot fill
   the batch (a lone request at low load), while under load the open reservations of requests
   being decoded keep the batch gathering up to the delay. The deadline is measured from the oldest
   item's arrival, not from when the dispatcher got round to it, so items that already waited
   behind a busy handler are dispatched as soon as a compute slot frees up (a backlog of at least
   ``max_batch_size`` dispatches at once as well).
4. Each batch runs the synchronous handler in the executor (a worker thread), so the event loop
   keeps accepting, decoding and gathering the next batch while one computes. The handler
   returns one result per item, in order; an exception or a wrong number of results fails the
   futures of that batch only.

The bound (``max_queue``, counted in items = images)
----------------------------------------------------
A slot is held from ``reserve`` until the item's batch has *finished computing*: it counts
reserved-but-not-submitted items, queued items and in-compute items. Counting in-compute items
makes ``max_queue`` a bound on all the work the server has accepted and not yet answered, which
is what bounds both memory (decoded images are alive until their batch finishes) and the worst
queueing latency a client can see. Consequence: ``max_queue`` should be at least
``max_batch_size * max_in_flight``, otherwise batches can never fill.

Cancellation and shutdown
-------------------------
A future cancelled while queued (the client went away) is removed at once, its slot is
returned, and it never reaches the handler. A future cancelled during compute is simply not
completed. Every completion checks ``fut.done()`` first, so cancellation can never cause
``InvalidStateError``.

``stop()`` stops accepting (``reserve`` raises ``BatcherStopped``), dispatches queued items
without waiting for their delay, and waits up to ``drain_timeout_s`` for every slot to be
freed (queued and in-flight batches finished, outstanding reservations submitted and computed
or released). Whatever is still pending then gets ``BatcherStopped``; background tasks are
cancelled and awaited. A handler call that is stuck in its thread cannot be interrupted: its
futures are failed and its eventual result is discarded.

Threading: every public method must be called from the event loop thread that ran ``start()``.
Only the handler runs elsewhere.
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
]

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Fewer free slots than requested; raised by `Batcher.reserve` before any work is done."""

    def __init__(self, requested: int, available: int, capacity: int) -> None:
        super().__init__(f"batch queue full: {requested} slot(s) requested, {available} of {capacity} free")
        self.requested = requested
        self.available = available
        self.capacity = capacity


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


class _State(enum.Enum):
    QUEUED = enum.auto()
    DISPATCHED = enum.auto()
    DROPPED = enum.auto()


@dataclass(eq=False, slots=True)
class _Entry(Generic[T, R]):
    seq: int
    item: T
    future: asyncio.Future[tuple[R, BatchInfo]]
    enqueued_at: float  # loop.time()
    state: _State = _State.QUEUED


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

    def __init__(self, batcher: Batcher[T, R], n: int) -> None:
        self._batcher = batcher
        self._remaining = n

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
        return self._batcher._enqueue(item)

    def release(self) -> None:
        """Give back the slots that were not submitted. Idempotent."""
        if self._remaining:
            n, self._remaining = self._remaining, 0
            self._batcher._release_reserved(n)

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
        max_delay_s: float,
        max_queue: int,
        executor: concurrent.futures.Executor | None = None,
        max_in_flight: int = 1,
        observer: BatchObserver | None = None,
        dispatch_when_idle: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._handler = handler
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._max_in_flight = max_in_flight
        self._dispatch_when_idle = dispatch_when_idle
        self._observer: BatchObserver = observer if observer is not None else NullObserver()
        # An injected executor belongs to the caller; one we create is ours to shut down.
        self._executor = executor
        self._owns_executor = executor is None

        # OrderedDict keyed by sequence number: FIFO order, O(1) removal of a cancelled entry.
        self._queue: OrderedDict[int, _Entry[T, R]] = OrderedDict()
        self._seq = itertools.count()
        self._batch_ids = itertools.count(1)
        self._used = 0  # reserved + queued + in-compute items: the bounded quantity
        self._reserved = 0
        self._in_flight = 0
        self._active: dict[int, _Batch[T, R]] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None

        self._wakeup = asyncio.Event()  # any change the dispatcher may care about
        self._drained = asyncio.Event()  # set when stopping and no slot is used
        self._stopped = asyncio.Event()
        self._started = False
        self._stop_called = False
        self._stopping = False  # reserve() refuses; queued items dispatch without delay
        self._closed = False  # shut down: nothing runs any more, submit() refuses

    # -- public state -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The bound, in items (`max_queue`)."""
        return self._max_queue

    @property
    def available(self) -> int:
        """Free slots: how many items `reserve` would accept right now."""
        return self._max_queue - self._used

    @property
    def queue_depth(self) -> int:
        """Submitted items waiting for dispatch."""
        return len(self._queue)

    @property
    def reserved(self) -> int:
        """Slots reserved but not yet submitted."""
        return self._reserved

    @property
    def in_flight(self) -> int:
        """Batches currently computing."""
        return self._in_flight

    @property
    def running(self) -> bool:
        """Started and not stopping: `reserve` accepts work."""
        return self._started and not self._stopping

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher (and the worker threads, unless an executor was injected)."""
        if self._started or self._stopping:
            raise RuntimeError("a Batcher can be started only once")
        self._started = True
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._max_in_flight, thread_name_prefix="batcher"
            )
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop(), name="batcher")
        self._dispatcher.add_done_callback(self._on_dispatcher_done)

    async def stop(self, drain_timeout_s: float | None = 30.0) -> None:
        """Stop accepting, drain for up to `drain_timeout_s` (None: no limit), then fail the rest.

        Idempotent; a concurrent second call waits for the first to finish.
        """
        if self._stop_called:
            await self._stopped.wait()
            return
        self._stop_called = True
        self._stopping = True
        self._wakeup.set()  # the dispatcher must stop waiting for delays
        try:
            if self._started and (drain_timeout_s is None or drain_timeout_s > 0):
                if self._used == 0:
                    self._drained.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
        finally:
            # Also runs if the caller is cancelled mid-drain: nothing may stay pending.
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._closed = True
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

    def reserve(self, n: int) -> Reservation[T, R]:
        """Reserve `n` slots at once, or none: raises QueueFull / BatcherStopped. No awaits."""
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of slots ({n})")
        if self._stopping:
            raise BatcherStopped("batcher is stopping")
        if n > self.available:
            raise QueueFull(n, self.available, self._max_queue)
        self._used += n
        self._reserved += n
        return Reservation(self, n)

    def _release_reserved(self, n: int) -> None:
        self._reserved -= n
        self._release(n)
        self._wakeup.set()  # fewer items on their way: a waiting batch may go now

    def _release(self, n: int) -> None:
        self._used -= n
        if self._stopping and self._used == 0:
            self._drained.set()

    def _enqueue(self, item: T) -> asyncio.Future[tuple[R, BatchInfo]]:
        self._reserved -= 1
        if self._closed:
            self._release(1)
            raise BatcherStopped("batcher is stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[R, BatchInfo]] = loop.create_future()
        entry: _Entry[T, R] = _Entry(next(self._seq), item, future, loop.time())
        self._queue[entry.seq] = entry
        future.add_done_callback(partial(self._on_future_done, entry))
        self._observe(lambda: self._observer.on_queue_depth(len(self._queue)))
        self._wakeup.set()
        return future

    def _on_future_done(self, entry: _Entry[T, R], future: asyncio.Future[tuple[R, BatchInfo]]) -> None:
        # Fires for every completion; only a cancellation while still queued needs action.
        if entry.state is _State.QUEUED and future.cancelled():
            self._drop([entry])

    def _drop(self, entries: list[_Entry[T, R]]) -> None:
        """Remove queued entries whose futures were cancelled and give their slots back."""
        for entry in entries:
            entry.state = _State.DROPPED
            self._queue.pop(entry.seq, None)
        self._release(len(entries))
        self._observe(lambda: self._observer.on_dropped_cancelled(len(entries)))
        self._observe(lambda: self._observer.on_queue_depth(len(self._queue)))
        self._wakeup.set()  # the oldest item may have changed, and with it the deadline

    def _fail_queued(self, error: BaseException) -> None:
        entries = list(self._queue.values())
        self._queue.clear()
        for entry in entries:
            entry.state = _State.DROPPED
            if not entry.future.done():
                entry.future.set_exception(error)
        if entries:
            self._release(len(entries))
            self._observe(lambda: self._observer.on_queue_depth(0))

    # -- dispatching ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before looking at the state: any change after this point sets it again,
            # so no wake-up is lost (everything here runs on the loop thread, without awaits).
            self._wakeup.clear()
            wake_at: float | None = None
            while self._queue and self._in_flight < self._max_in_flight:
                oldest = next(iter(self._queue.values()))
                deadline = oldest.enqueued_at + self._max_delay_s
                # Waiting only pays while more items are on their way: an open reservation is a
                # request already admitted and still uploading or decoding. With none, the batch
                # cannot grow before its delay ends, so it goes now (at low load: no added latency).
                nothing_coming = self._dispatch_when_idle and self._reserved == 0
                if (
                    len(self._queue) >= self._max_batch_size
                    or self._stopping
                    or nothing_coming
                    or loop.time() >= deadline
                ):
                    self._dispatch(loop)
                else:
                    wake_at = deadline
                    break
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
        while self._queue and len(entries) < self._max_batch_size:
            _, entry = self._queue.popitem(last=False)
            # Cancelled but its done-callback has not run yet: drop it here.
            (cancelled if entry.future.done() else entries).append(entry)
        if cancelled:
            self._drop(cancelled)
        self._observe(lambda: self._observer.on_queue_depth(len(self._queue)))
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
        self._release(size)
        self._observe(lambda: self._observer.on_batch_end(batch.batch_id, size, duration_s, error))
        self._observe(lambda: self._observer.on_in_flight(self._in_flight))
        self._wakeup.set()  # a compute slot is free

    def _on_dispatcher_done(self, task: asyncio.Task[None]) -> None:
        # The loop only ends by cancellation; anything else is a bug. Fail the queue rather than
        # leave its futures pending until stop(), and refuse new work.
        if task.cancelled() or task.exception() is None:
            return
        logger.error("batch dispatcher crashed", exc_info=task.exception())
        self._stopping = True
        self._fail_queued(BatcherStopped("batch dispatcher crashed"))

    def _observe(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            logger.exception("batch observer failed")
