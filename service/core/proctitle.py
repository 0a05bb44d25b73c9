"""What a child of the supervisor does first: its title, and exiting with the supervisor.

Titles (`ps`, `top`): `lungserve: supervisor`, `lungserve: front N`, `lungserve: model`.
setproctitle is a serving dependency; without it (an odd install) the title is simply not set.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux prctl): a SIGKILLed supervisor must not
    leave fronts serving a port nobody watches. Its own drain still runs."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a serving dependency
        return
    setproctitle.setproctitle(title)
