"""Give freed heap memory back to the OS after bursts of large decodes (glibc only).

glibc keeps freed arena memory in the process, so RSS stays at its peak after a burst of large
images; `malloc_trim(0)` returns it. It walks the heap, so it runs only after large decodes and
large bodies, never per tile; elsewhere (musl, macOS) it is a no-op. Why: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def trim() -> bool:
    """Release free heap memory to the OS; True when some was released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class Trimmer:
    """`trim()` once after large work, off the event loop and at most every `interval_s`.

    Marked when a large body is released; trimming later rather than at once lets the request's
    last references (its response, its decoded images) go first.
    """

    def __init__(self, interval_s: float = 1.0, trim_heap: Callable[[], object] = trim) -> None:
        self.interval_s = interval_s
        self._trim = trim_heap
        self._pending = False

    def mark(self) -> None:
        self._pending = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self._pending:
                self._pending = False
                await asyncio.to_thread(self._trim)
