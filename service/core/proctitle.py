"""Process titles (`ps`, `top`): `lungserve: supervisor`, `lungserve: front N`, `lungserve: model`.

setproctitle is a serving dependency; without it (an odd install) the title is simply not set.
"""

from __future__ import annotations


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a serving dependency
        return
    setproctitle.setproctitle(title)
