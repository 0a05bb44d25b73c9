"""SIGTERM while serving: the handler only flags; readiness turns 503 on the loop's next tick.

A signal handler runs between two bytecodes of the main thread, which may hold a lock at that
moment. A front once deadlocked: SIGTERM landed while prometheus_client held its multiprocess
lock, and the handler's readiness gauge needed that lock.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import pytest
import uvicorn

from service.http.server import LungserveServer

pytestmark = pytest.mark.anyio


class RecordingHooks:
    """ShutdownHooks recording, for each draining() call, whether `lock` was held then."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.draining_calls: list[bool] = []

    def draining(self) -> None:
        self.draining_calls.append(self.lock.locked())

    async def drain(self) -> None:
        pass


def make_server(lock: threading.Lock, shutdown_delay_s: float) -> tuple[LungserveServer, RecordingHooks]:
    hooks = RecordingHooks(lock)

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    return LungserveServer(uvicorn.Config(app), hooks, shutdown_delay_s), hooks


@contextmanager
def sigterm_handler(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_sigterm_landing_while_a_lock_is_held_leaves_draining_to_the_next_tick() -> None:
    lock = threading.Lock()
    server, hooks = make_server(lock, shutdown_delay_s=3600.0)
    with sigterm_handler(server.handle_exit), lock:
        signal.raise_signal(signal.SIGTERM)  # the handler runs before this call returns
        assert hooks.draining_calls == []
    assert await server.on_tick(1) is False  # the delay has not passed: still serving
    assert hooks.draining_calls == [False]  # on the loop, with the lock free
    await server.on_tick(2)
    assert hooks.draining_calls == [False]  # once


async def test_a_second_sigterm_exits_without_waiting_out_the_delay() -> None:
    server, _ = make_server(threading.Lock(), shutdown_delay_s=3600.0)
    with sigterm_handler(server.handle_exit):
        signal.raise_signal(signal.SIGTERM)
        assert await server.on_tick(1) is False
        signal.raise_signal(signal.SIGTERM)
    assert server.should_exit


async def test_sigterm_before_uvicorn_installed_its_handler_still_stops_the_server() -> None:
    """The handler around run() does not swallow a SIGTERM that lands before serving starts."""
    server, hooks = make_server(threading.Lock(), shutdown_delay_s=0.0)
    with sigterm_handler(server.handle_exit_outside_serve):
        signal.raise_signal(signal.SIGTERM)
    assert await server.on_tick(1) is True
    assert hooks.draining_calls == [False]


async def test_the_signal_uvicorn_raises_again_after_serving_changes_nothing() -> None:
    server, hooks = make_server(threading.Lock(), shutdown_delay_s=0.0)
    server.started = True
    with sigterm_handler(server.handle_exit_outside_serve):
        signal.raise_signal(signal.SIGTERM)
    assert await server.on_tick(1) is False
    assert hooks.draining_calls == []
