"""What a child of the supervisor does first: its title, and exiting with the supervisor.

Titles (`ps`, `top`): `lungserve: supervisor`, `lungserve: front N`, `lungserve: model`.
setproctitle is a serving dependency; without it (an odd install) the title is simply not set.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl): a SIGKILLed supervisor must not
    leave fronts serving a port nobody watches. SIGKILL, not SIGTERM: a front still starting up
    (waiting for a model process that died with the supervisor) would never act on a SIGTERM.
    The orderly way out is the supervisor's SIGTERM, which keeps the drain order.

    `parent` is the supervisor's pid as it gave it: if it died before prctl took effect, this
    process has already been re-parented and must go now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a serving dependency
        return
    setproctitle.setproctitle(title)
