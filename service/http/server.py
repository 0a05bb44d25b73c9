"""uvicorn as `lungserve serve` runs it: connection guards and an ordered shutdown.

`GuardedHttpToolsProtocol` bounds connections, header time and header size, and answers broken
framing with our JSON 400, because uvicorn's httptools protocol has none of these limits.
`ShutdownHooks` orders the shutdown so every admitted request is answered by us. The limits,
the order and why: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import uvicorn

from service.http.errors import raw_json_response

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

log = logging.getLogger(__name__)


# How long a refused connection is kept half-closed, reading and discarding, before it is closed.
_LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    header_timeout_s: float
    retry_after_s: int = 1
    # (method, path) -> True: refuse with 503 now, from the headers, without running the app.
    # Under overload this is the cheap path: no ASGI task, no routing, no middleware.
    shed: Callable[[bytes, bytes], bool] | None = None


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a serving dependency; h11 is the fallback
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class _LingeringClose:
    """The transport a request's response is written to: when the app answered before the body
    was received (an early 413 or 503 with `Connection: close`), closing at once would reset the
    connection while the client is still sending, and the reset can destroy the answer before
    the client reads it. Then: half-close, discard the rest, close after a short linger."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol._linger()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with a connection cap, a header timeout and size limit."""

        limits: ClassVar[ConnectionLimits]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._raw_header_bytes = 0  # bytes received while the headers were incomplete
            self._header_bytes = 0  # request line and headers, as parsed
            self._headers_done = False
            self._too_large = False
            self._skip_message = False  # refused from its headers: the rest of it is discarded
            self._message_complete = False
            self._refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > self.limits.max_connections:
                self._refuse(503, "overloaded", "too many open connections; retry shortly", "Service Unavailable")
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            idle = self.cycle is None or self.cycle.response_complete
            if self._header_timer is None and idle and self._headers_done:
                self._arm_header_timer()  # the first bytes of a keep-alive request
            waiting = not self._headers_done
            super().data_received(data)
            if waiting and not self._headers_done:
                self._raw_header_bytes += len(data)  # a header still streaming in
            if self._too_large or self._raw_header_bytes > self.limits.max_header_bytes:
                self._refuse(
                    431,
                    "headers_too_large",
                    f"request line and headers exceed LUNGSERVE_MAX_HEADER_BYTES = {self.limits.max_header_bytes}",
                    "Request Header Fields Too Large",
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._message_complete = False
            self._header_bytes = 0
            self._raw_header_bytes = 0
            self._headers_done = False

        def on_url(self, url: bytes) -> None:
            self._header_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            self._headers_done = True
            if self._header_bytes > self.limits.max_header_bytes:
                self._too_large = self._skip_message = True  # no request task: data_received answers 431
                return
            shed = self.limits.shed
            if shed is not None and shed(self.parser.get_method(), self.url.partition(b"?")[0]):
                self._skip_message = True
                self._refuse(503, "overloaded", "the server is at capacity; retry shortly", "Service Unavailable")
                return
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = _LingeringClose(self.transport, self)  # type: ignore[assignment]

        def on_body(self, body: bytes) -> None:
            if not self._skip_message:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._message_complete = True
            if not self._skip_message:
                super().on_message_complete()

        def shutdown(self) -> None:
            # uvicorn closes a connection whose request it has not parsed yet: the client, whose
            # request may already be on its way, sees the connection drop. Answer it instead.
            if self.cycle is None or (self.cycle.response_complete and not self._headers_done):
                if not self._refused:
                    self._refuse(503, "shutting_down", "the server is shutting down", "Service Unavailable")
                return
            super().shutdown()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "bad_request", f"malformed HTTP request: {msg}", "Bad Request")

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            self._refuse(
                408,
                "header_timeout",
                f"request headers not complete within LUNGSERVE_HEADER_TIMEOUT_S = {self.limits.header_timeout_s:g} s",
                "Request Timeout",
            )

        def _linger(self) -> None:
            transport = self.transport
            if self._message_complete or transport.is_closing() or not transport.can_write_eof():
                transport.close()  # the whole request was read: an ordinary close
                return
            self._refused = True  # data_received discards the rest of the body from now on
            transport.write_eof()
            self.loop.call_later(_LINGER_S, transport.close)

        def _refuse(self, status: int, code: str, message: str, reason: str) -> None:
            self._refused = True
            self._disarm_header_timer()
            transport = self.transport
            if transport.is_closing():
                return
            retry = self.limits.retry_after_s if status == 503 else None
            transport.write(raw_json_response(status, code, message, reason, retry))
            # Lingering close (as nginx does): closing now, with the client's request bytes still
            # arriving, would send a reset that can destroy this answer before the client reads
            # it. Half-close instead, discard what still comes (data_received ignores it), and
            # close for good after a short linger.
            if transport.can_write_eof():
                transport.write_eof()
                self.loop.call_later(_LINGER_S, transport.close)
            else:  # pragma: no cover - TCP transports can always half-close
                transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol] | None:
    """A protocol class bound to `limits`; None when httptools is not installed."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return None
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,), {"limits": limits})


class ShutdownHooks(Protocol):
    def draining(self) -> None:
        """Readiness answers 503 from now on; requests are still served."""

    async def drain(self) -> None:
        """Refuse new work, finish (or answer 503 to) everything admitted within the drain timeout."""


class LungserveServer(uvicorn.Server):
    """uvicorn.Server with the shutdown order above."""

    def __init__(self, config: uvicorn.Config, hooks: ShutdownHooks, shutdown_delay_s: float) -> None:
        super().__init__(config)
        self._hooks = hooks
        self._shutdown_delay_s = shutdown_delay_s
        self._exit_requested_at: float | None = None
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._exit_requested_at is None and not self.should_exit:
            # Runs in the signal handler, between two bytecodes of the loop thread, which may be
            # holding a lock the hooks need (prometheus_client's multiprocess values share one:
            # a front deadlocked here). So only a flag; the next tick calls draining().
            self._exit_requested_at = time.monotonic()
            return
        super().handle_exit(sig, frame)  # a second signal: go now (a second SIGINT forces)

    def handle_exit_outside_serve(self, sig: int, frame: FrameType | None) -> None:
        """The SIGTERM/SIGINT handler around `run()`, where uvicorn's own is not installed.

        Before serve: the signal must still stop the server (swallowing it would leave it
        running). After serve, uvicorn raises the signal it captured again: nothing more to do,
        and the process exits 0 rather than by the default action.
        """
        if not self.started:
            self.handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        requested = self._exit_requested_at
        if requested is not None:
            self._drain_readiness()
            if time.monotonic() - requested >= self._shutdown_delay_s:
                self.should_exit = True
        return await super().on_tick(counter)

    def _drain_readiness(self) -> None:
        if not self._draining:
            self._draining = True
            self._hooks.draining()

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self._drain_readiness()
        # The drain runs while uvicorn waits for the requests in flight: they end with their
        # result or our 503 before uvicorn's own timeout would cancel them.
        drain = asyncio.ensure_future(self._hooks.drain())
        try:
            await super().shutdown(sockets)
        finally:
            await drain


def graceful_timeout_s(drain_timeout_s: float, request_deadline_s: float) -> int:
    """uvicorn's `timeout_graceful_shutdown`: above our drain and any request's deadline."""
    return math.ceil(max(drain_timeout_s, request_deadline_s)) + 5


def build_server(app: FastAPI, settings: Settings) -> tuple[LungserveServer, list[socket.socket] | None]:
    """The uvicorn server `lungserve serve` runs, and its listening sockets when there are two
    (public and `LUNGSERVE_ADMIN_PORT`; None: uvicorn binds host:port itself)."""
    limits = ConnectionLimits(
        settings.max_connections,
        settings.max_header_bytes,
        settings.header_timeout_s,
        retry_after_s=settings.retry_after_s,
        shed=app.state.shed_at_headers,
    )
    protocol = guarded_protocol(limits)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        log_config=None,  # uvicorn leaves the logging set up by `lungserve serve` alone
        access_log=False,  # RequestContextMiddleware writes one access line per request
        http=protocol if protocol is not None else "h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,  # the same bound without httptools
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        timeout_graceful_shutdown=graceful_timeout_s(settings.drain_timeout_s, settings.request_deadline_s),
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local client could then
        # choose its address (and reset the admin rate limit). Only the operator's proxies count.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=list(settings.forwarded_allow_ips),
    )
    server = LungserveServer(config, app.state.shutdown, settings.shutdown_delay_s)
    if settings.admin_port is None:
        return server, None
    sockets = [_listen(settings.host, port) for port in (settings.port, settings.admin_port)]
    return server, sockets


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
