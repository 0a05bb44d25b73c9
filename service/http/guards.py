"""The HTTP side of a request's wait: its deadline (504) and its client leaving (499).

Both cancel the awaited work, and with it the request's queued batcher futures, so an
abandoned image never reaches the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from service.core.state import ServiceState
from service.errors import ClientGone, DeadlineExceeded, LungserveError

X = TypeVar("X")
Receive = Callable[[], Awaitable[Mapping[str, Any]]]


@asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """`asyncio.timeout` that reports as 504: cancelling the wait cancels the batcher futures."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            yield
    except TimeoutError as exc:
        if timeout.expired():
            raise DeadlineExceeded(f"no answer within the request deadline of {seconds:g} s") from exc
        raise


Watch = Callable[[Awaitable[X]], Awaitable[X]]


@asynccontextmanager
async def guarded(service: ServiceState, receive: Receive | None = None) -> AsyncIterator[Watch[Any]]:
    """A door's request: within its deadline, counted once if refused as a whole; the `watch` it
    gives cancels awaited work when the client leaves (use it once the body is read)."""

    def watch(work: Awaitable[X]) -> Awaitable[X]:
        return work if receive is None else unless_disconnected(work, receive)

    try:
        async with deadline(service.settings.request_deadline_s):
            yield watch
    except LungserveError as exc:
        service.observer.on_rejected(exc)  # overload, deadline, not ready, shutting down, bad input
        raise


async def _disconnected(receive: Receive) -> None:
    # After the body has been read, the server's receive() only returns once the client
    # has gone (or the response is complete, which cannot happen while we wait here).
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[X], receive: Receive) -> X:
    """Await `work`, but cancel it (and with it the queued batcher futures) if the client leaves.

    Call only once the request body has been consumed.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done and watcher.exception() is not None:
            # receive() itself failed: we cannot watch, so just wait for the work.
            await asyncio.wait({task})
        if task.done():
            return task.result()
        raise ClientGone("the client disconnected before its answer was ready")
    finally:
        watcher.cancel()
        task.cancel()
        # Let both finish their cancellation, so nothing is left running or unretrieved.
        await asyncio.wait({task, watcher})
        for finished in (task, watcher):
            if not finished.cancelled():
                finished.exception()
