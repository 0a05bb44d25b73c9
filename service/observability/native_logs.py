"""Native libraries that print to stderr by themselves, past the log's format.

Pillow's bundled libtiff prints each decode error ("ZIPDecode: Decoding error at scanline 0,
incorrect data check.") to stderr: with JSON logs, a line no log pipeline can parse, one for
every damaged TIFF a client sends. Pillow turns the same error into an exception, and the client
into a 422, so the print adds nothing: its handlers are switched off. OpenSlide's libtiff is its
own copy, and OpenSlide already keeps its messages (they reach the 422's detail).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def pillow_libtiff() -> list[Path]:
    """The libtiff copies loaded from Pillow's own wheel (pillow.libs, PIL/.dylibs), Linux only."""
    import PIL
    import PIL._imaging  # links libtiff: after this it is mapped

    wheel = Path(PIL.__file__).resolve().parent.parent
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing found, nothing switched off
        return []
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith("libtiff"):
            path = Path(fields[5])
            if path.parent.parent == wheel and path.parent.name in ("pillow.libs", ".dylibs"):
                found.add(path)
    return sorted(found)


def silence_pillow_libtiff() -> int:
    """Switch off the stderr error and warning handlers of Pillow's libtiff; the copies done.

    Idempotent. A Pillow built against the system's libtiff is left alone: other libraries of the
    process may rely on that copy's handlers.
    """
    done = 0
    for path in pillow_libtiff():
        try:
            lib = ctypes.CDLL(str(path))
            for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
                setter = getattr(lib, name)
                setter.restype = ctypes.c_void_p
                setter.argtypes = [ctypes.c_void_p]
                setter(None)
        except (OSError, AttributeError) as exc:  # an odd build: its prints stay
            log.warning("could not quiet %s: %s", path.name, exc)
            continue
        done += 1
    return done
