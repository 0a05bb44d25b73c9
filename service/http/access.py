"""Optional API keys: who may call the prediction routes.

With `LUNGSERVE_API_KEYS_FILE` (`NAME:KEY` lines), every route not in `OPEN_ROUTES` needs
`Authorization: Bearer KEY` or `X-API-Key: KEY`, else 401. Keys are compared in constant time;
only a key's name is logged or counted. The check is an app-wide dependency, after routing and
before the body is read, so new routes are protected by default (docs/clients.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from fastapi import Request

from service.errors import Unauthorized
from service.observability.logs import request_context_from_scope

# Route templates anyone may call: probes, scrapes and the docs must work without a key, and a
# browser cannot send a header when it opens a page (the page at / then sends the key itself).
OPEN_ROUTES: Final = frozenset(
    {
        "/",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/docs-assets/{asset:path}",
        "/page/{asset:path}",  # the page's own files; /page/config.json needs a key
    }
)
# Admin routes check LUNGSERVE_ADMIN_TOKEN themselves (an API key must not open them, nor be needed).
OWN_AUTH_PREFIXES: Final = ("/admin/",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# How often the keys file is looked at (one stat) for a change: rotation without a restart.
RECHECK_S: Final = 1.0

log = logging.getLogger(__name__)


class ApiKeysFileError(Exception):
    """The keys file cannot be used; the message names the line, never a key."""


@dataclass(frozen=True)
class ApiKeys:
    """Key digests by name. Built once per app from the file (`load`)."""

    digests: tuple[tuple[str, bytes], ...]

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeysFileError(f"LUNGSERVE_API_KEYS_FILE {path}: cannot read it ({exc})") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "LUNGSERVE_API_KEYS_FILE") -> ApiKeys:
        digests: list[tuple[str, bytes]] = []
        names: set[str] = set()
        seen: set[bytes] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = (part.strip() for part in line.partition(":"))
            where = f"{source} line {number}"
            if not sep or not key:
                raise ApiKeysFileError(f"{where}: expected NAME:KEY")
            if not _NAME.match(name):
                raise ApiKeysFileError(f"{where}: the name must be 1-64 letters, digits, '.', '_' or '-'")
            if name in names:
                raise ApiKeysFileError(f"{where}: the name {name!r} is used twice")
            if len(key) < 16:
                raise ApiKeysFileError(f"{where}: the key of {name!r} is shorter than 16 characters")
            digest = _digest(key)
            if digest in seen:
                raise ApiKeysFileError(f"{where}: the key of {name!r} is also another name's key")
            names.add(name)
            seen.add(digest)
            digests.append((name, digest))
        if not digests:
            raise ApiKeysFileError(f"{source}: no NAME:KEY line (an empty file would lock every client out)")
        return cls(tuple(digests))

    def identify(self, key: str) -> str | None:
        """The name of `key`, or None. Compares against every key, whatever matches first."""
        given = _digest(key)
        found: str | None = None
        for name, digest in self.digests:
            if hmac.compare_digest(given, digest):
                found = name
        return found


class KeyRing(Protocol):
    def identify(self, key: str) -> str | None: ...


class KeysFile:
    """`LUNGSERVE_API_KEYS_FILE`, re-read when it changes (a rotated Kubernetes secret, an edit):
    its modification time, size and inode are looked at, at most once every `RECHECK_S`. A new
    version that cannot be used is logged and the keys in force stay (never a locked-out fleet)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._stamp = self._stat()
        self.keys = ApiKeys.load(path)  # at start-up a bad file is fatal (ApiKeysFileError)
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look (not more than once per RECHECK_S)."""
        now = self._clock()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.keys = ApiKeys.load(self.path)
        except ApiKeysFileError as exc:
            log.warning("API keys file changed but cannot be used; the previous keys stay: %s", exc)
            return
        log.info("API keys re-read", extra={"api_keys": len(self.keys.digests)})

    def identify(self, key: str) -> str | None:
        self.refresh()
        return self.keys.identify(key)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def presented_key(request: Request) -> str | None:
    """`X-API-Key: KEY`, else `Authorization: Bearer KEY`."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def is_open(route: str) -> bool:
    return route in OPEN_ROUTES or route.startswith(OWN_AUTH_PREFIXES)


KeyObserver = Callable[[str | None, str], None]  # (key name or None, outcome) -> metrics


def api_key_guard(keys: KeyRing, observe: KeyObserver) -> Callable[[Request], None]:
    """The app-wide dependency: names the caller, or refuses the request with 401."""

    def require_api_key(request: Request) -> None:
        route = getattr(request.scope.get("route"), "path", "")
        if is_open(route):
            return
        key = presented_key(request)
        if key is None:
            observe(None, "missing")
            raise Unauthorized("this server needs an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        name = keys.identify(key)
        if name is None:
            observe(None, "invalid")
            raise Unauthorized("the API key is not valid")
        observe(name, "ok")
        ctx = request_context_from_scope(request.scope)
        if ctx is not None:
            ctx.api_key = name  # the access log names the caller

    return require_api_key
