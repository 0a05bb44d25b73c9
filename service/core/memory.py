"""Give freed heap memory back to the OS after bursts of large decodes (glibc only).

A 7000 x 7000 PNG decodes to ~150 MB in Pillow blocks and NumPy arrays. glibc raises its mmap
threshold dynamically after such frees, so the next large buffers come from the heap arenas,
and freed arena memory stays in the process: RSS climbed from 265 to 832 MB and stayed there
(issue 10, row 8). `malloc_trim(0)` returns the free pages of every arena. It costs a walk of
the heap, so it runs only after large decodes and large bodies, never per tile. Elsewhere
(musl, macOS) it is a no-op. `MALLOC_ARENA_MAX=2` in the environment (docs/reliability.md)
additionally bounds the number of arenas the decode threads spread over.
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
