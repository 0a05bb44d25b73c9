"""The `queue_limit` bound of a `Batcher`: its slot count and the `Reservation` callers hold.

A slot is taken by `reserve`, kept while its item is queued and computing, and freed when its
batch has finished (or its future was cancelled mid-compute); docs/batching.md explains why.
With a `SharedBound` (the fronts of one server, each with its own batcher), every slot taken
here also takes one of the shared count, and every slot freed here gives it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar

from service.core.batch_types import BatchInfo, QueueFull, SharedBound

__all__ = ["OnDone", "Reservation", "Slots"]

T = TypeVar("T")
R = TypeVar("R")

# Told once, synchronously, when an item's future settles (result, error or cancellation).
OnDone = Callable[[asyncio.Future[tuple[R, BatchInfo]]], None]


class Slots:
    """The `queue_limit` bound: reserved + queued + computing items, in one count."""

    def __init__(self, limit: int, on_change: Callable[[], None], shared: SharedBound | None = None) -> None:
        self.limit = limit
        self.shared = shared  # also bounded by this count, shared with other batchers
        self.used = 0
        self.reserved = 0  # taken by reserve(), not yet submitted
        self.draining = False
        self.drained = asyncio.Event()  # set while draining once no slot is used
        self._on_change = on_change

    @property
    def available(self) -> int:
        mine = self.limit - self.used
        if self.shared is None:
            return mine
        return max(0, min(mine, self.shared.limit - self.shared.used))

    def reserve(self, n: int) -> None:
        if n > self.limit - self.used:
            raise QueueFull(n, self.limit - self.used, self.limit)
        if self.shared is not None:
            free = self.shared.try_take(n)  # all or nothing, atomically across the sharers
            if n > free:
                raise QueueFull(n, max(0, free), self.shared.limit)
        self.used += n
        self.reserved += n

    def submitted(self, n: int = 1) -> None:
        """`n` reserved slots now hold queued items (or are freed right after, if closed)."""
        self.reserved -= n

    def unreserve(self, n: int) -> None:
        """`n` reserved slots will never be submitted: fewer items on their way."""
        self.reserved -= n
        self.free(n)
        self._on_change()

    def free(self, n: int) -> None:
        """`n` slots are free again: every path that ends a slot's use comes here, once."""
        self.used -= n
        if self.shared is not None and n:
            self.shared.give(n)
        if self.draining and self.used == 0:
            self.drained.set()

    def start_draining(self) -> None:
        self.draining = True
        if self.used == 0:
            self.drained.set()


class Reservation(Generic[T, R]):
    """`n` slots of a batcher's bound, held until submitted or released."""

    def __init__(
        self,
        slots: Slots,
        enqueue: Callable[[Sequence[T], OnDone[R] | None], list[asyncio.Future[tuple[R, BatchInfo]]]],
        n: int,
    ) -> None:
        self._slots = slots
        self._enqueue = enqueue
        self._remaining = n

    @property
    def remaining(self) -> int:
        """Slots still reserved (not yet submitted or released)."""
        return self._remaining

    def submit(self, item: T, on_done: OnDone[R] | None = None) -> asyncio.Future[tuple[R, BatchInfo]]:
        """Queue `item` in one reserved slot; the future resolves to `(result, BatchInfo)`.

        `on_done(future)`, if given, runs once as the future settles, synchronously, inside the
        batcher: unlike `add_done_callback` it costs no loop callback per item (the model process
        answers every image through it). It must be quick; an exception from it is logged.
        Raises RuntimeError when no reserved slot is left, and BatcherStopped once the batcher
        has shut down (the slot is given back).
        """
        if self._remaining <= 0:
            raise RuntimeError("reservation has no slot left: reserve one slot per item")
        self._remaining -= 1
        self._slots.submitted()
        return self._enqueue((item,), on_done)[0]

    def submit_all(
        self, items: Sequence[T], on_done: OnDone[R] | None = None
    ) -> list[asyncio.Future[tuple[R, BatchInfo]]]:
        """`submit` for each item, in order, as one step: the queue and its observer are updated
        once for all of them (the model process queues a whole frame of images this way).

        Raises RuntimeError, submitting none, when fewer slots than items are left.
        """
        if len(items) > self._remaining:
            raise RuntimeError(f"reservation has {self._remaining} slot(s) left for {len(items)} item(s)")
        if not items:
            return []
        self._remaining -= len(items)
        self._slots.submitted(len(items))
        return self._enqueue(items, on_done)

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
