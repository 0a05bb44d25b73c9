"""The event loop our own asyncio processes run: uvloop when it is installed, else asyncio's.

The fronts get uvloop from uvicorn (`loop="auto"`); the model process runs its loop itself, and
its loop thread handles every frame and socket write of every front: uvloop does that work in C
(loadtest/feed.py, five paired runs: 8% less model-process CPU per image, 42.5 against 46.4 us).
uvloop comes with uvicorn[standard] on Linux; where it is missing, asyncio's loop serves the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` gives."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
