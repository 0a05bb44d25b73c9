"""The batcher's public vocabulary: its errors, `BatchInfo` and the observer protocol.

Standard library only, like the batcher (docs/batching.md); `service.core.batcher` re-exports
every name here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BatchInfo",
    "BatchObserver",
    "BatcherStopped",
    "HandlerResultError",
    "NullObserver",
    "QueueFull",
    "SharedBound",
]


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


class SharedBound(Protocol):
    """A `queue_limit` count shared with other batchers (other processes): a batcher given one
    takes a slot of it with each of its own and gives it back when its own is freed, so the
    limit holds across all of them (`service.core.queue_bound.QueueBound`, one per front)."""

    @property
    def limit(self) -> int: ...

    @property
    def used(self) -> int:
        """Slots taken by every sharer (a snapshot)."""
        ...

    def try_take(self, n: int) -> int:
        """Take `n` slots, or none: returns the free slots seen (>= n when taken)."""
        ...

    def give(self, n: int) -> None: ...


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


@dataclass(frozen=True, init=False)
class BatchInfo:
    """How one item was served; attached to its result for logs and Server-Timing."""

    batch_id: int
    size: int
    queue_wait_s: float  # from submit() to dispatch
    compute_s: float  # the handler call for the whole batch

    def __init__(self, batch_id: int, size: int, queue_wait_s: float, compute_s: float) -> None:
        # One is made per image (the batcher, and a front reading the model process's answer):
        # fields written straight into __dict__ cost half the generated object.__setattr__ calls
        # of a frozen dataclass. Still frozen: assignment after this raises FrozenInstanceError.
        fields = self.__dict__
        fields["batch_id"] = batch_id
        fields["size"] = size
        fields["queue_wait_s"] = queue_wait_s
        fields["compute_s"] = compute_s
