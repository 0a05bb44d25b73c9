"""HTTP guards: client-disconnect cancellation and the request deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from service.errors import ClientGone, DeadlineExceeded
from service.http.guards import deadline, unless_disconnected

pytestmark = pytest.mark.anyio


class FakeReceive:
    """An ASGI `receive` whose messages the test pushes."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()

    async def __call__(self) -> Mapping[str, Any]:
        return await self.messages.get()


async def test_returns_the_result_when_the_client_stays() -> None:
    receive = FakeReceive()
    work: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    work.set_result("answer")
    assert await unless_disconnected(work, receive) == "answer"


async def test_a_disconnect_cancels_the_pending_work() -> None:
    receive = FakeReceive()
    work: asyncio.Future[str] = asyncio.get_running_loop().create_future()  # e.g. a batcher future
    receive.messages.put_nowait({"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        await unless_disconnected(work, receive)
    assert work.cancelled()  # the batcher drops a cancelled queued item before compute


async def test_other_messages_are_not_a_disconnect() -> None:
    receive = FakeReceive()
    work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    receive.messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})

    asyncio.get_running_loop().call_soon(lambda: work.set_result(7))
    assert await unless_disconnected(work, receive) == 7


async def test_errors_of_the_work_propagate() -> None:
    receive = FakeReceive()
    work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    work.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await unless_disconnected(work, receive)


async def test_deadline_becomes_504_and_cancels_the_wait() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(DeadlineExceeded, match="deadline"):
        async with deadline(0.01):
            await never
    assert never.cancelled()


async def test_deadline_does_not_rename_other_timeouts() -> None:
    with pytest.raises(TimeoutError):
        async with deadline(60):
            raise TimeoutError("a socket timeout inside")
