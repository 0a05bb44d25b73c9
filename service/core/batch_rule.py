"""The batch rule, pure: when the queued items of a `Batcher` should go as one batch.

The dispatcher asks it whenever something changes; it is tested alone, without a batcher or
an event loop (docs/batching.md).
"""

from __future__ import annotations

__all__ = ["dispatch_delay"]


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
