"""`queue_limit` across every front: one shared count, taken synchronously before a body is read.

Admission cannot wait for a round trip to the model process (`reserve` has no awaits, and a
full queue must answer 503 from the headers), so the count lives in shared memory that every
front maps: one int64 cell per front, the images that front has admitted and not yet seen
answered. A front adds to its own cell only while holding an exclusive `flock` on the file, after
checking the sum of all cells; it subtracts from its own cell without the lock (one writer per
cell, and a stale read only errs on the side of refusing). The kernel drops a `flock` when its
holder dies, so a SIGKILLed front can never wedge the others; the supervisor zeroes its cell.

The model process's own batcher has the same `queue_limit`; since every image it receives was
counted here first, it never has to refuse one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path
from typing import Final

MAX_FRONTS: Final = 1024
_BYTES: Final = MAX_FRONTS * 8


class QueueBound:
    """One front's view of the shared count (`index` is its cell)."""

    def __init__(self, path: Path, index: int, limit: int) -> None:
        if not 0 <= index < MAX_FRONTS:
            raise ValueError(f"front index {index} outside 0..{MAX_FRONTS - 1}")
        self.index = index
        self.limit = limit
        # Opened here, not inherited: a flock belongs to an open file description, and an
        # inherited one would be shared with the parent and every sibling.
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._map = mmap.mmap(self._fd, _BYTES)
        import numpy as np  # here, not at the top: the supervisor (create, reset) stays numpy-free

        self._cells = np.frombuffer(self._map, dtype=np.int64)

    @staticmethod
    def create(path: Path) -> None:
        """The zeroed file (the supervisor, or a test, before any front starts)."""
        with open(path, "wb") as f:
            f.truncate(_BYTES)

    @staticmethod
    def reset(path: Path, index: int) -> None:
        """Zero a dead front's cell: nothing it admitted is waiting any more."""
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), _BYTES) as m:
            struct.pack_into("=q", m, index * 8, 0)

    @property
    def used(self) -> int:
        """Images admitted by every front and not yet answered (a lock-free snapshot)."""
        return int(self._cells.sum())

    @property
    def mine(self) -> int:
        return int(self._cells[self.index])

    def has_room(self) -> bool:
        return self.used < self.limit

    def try_take(self, n: int) -> int:
        """Take `n` slots, or none: returns the free slots seen (>= n when taken)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            available = self.limit - int(self._cells.sum())
            if n <= available:
                self._cells[self.index] += n
            return available
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def give(self, n: int) -> None:
        self._cells[self.index] -= n

    def clear(self) -> None:
        self._cells[self.index] = 0

    def close(self) -> None:
        import numpy as np

        self._cells = np.zeros(1, dtype=np.int64)  # drop the view before unmapping
        self._map.close()
        os.close(self._fd)
