"""Several fronts (docs/topology.md): one process runs slide jobs, every front answers /jobs.

Slide jobs have one owner, front 0: their queue, their tasks and their recovery at start live in
its `JobRunner`, so a job runs once and every answer about it comes from the one process that
knows it. Front 0 also serves the app on a private Unix socket (in the supervisor's run
directory, mode 0700). Every other front installs `JobsForwarder`: a request under /jobs goes
to that socket as it came (method, path, query, headers: the API key, Host, X-Request-ID), its
body streamed as it arrives and the answer streamed back -- a slide may be gigabytes, nothing
is held in memory. So front 0 checks the key, the limits and the job's owner exactly as one
process does, and its answers (errors, request ids) are the client's.

* Front 0 not answering (crashed and restarting, starting up, stopped): its socket refuses the
  connection at once (it is bound before the app starts, listened on only once it has), and the
  client gets JSON 503 `jobs_unavailable` with Retry-After: never a hang, never a 500.
* Counted once: front 0 counts every request it received in `lungserve_requests_total` and
  writes its access line; this front counts and logs (INFO) only the 503s it answered itself,
  and `lungserve_jobs_forwarded_total{outcome}` says how every forwarded request went.
* The scheme and client this front saw (after its trusted proxies) travel as X-Forwarded-Proto
  and X-Forwarded-For, replacing the client's; front 0 believes them on its private socket only
  (`TrustPrivateSocket`), so a job's `status_url` is the one a single process would give.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BadRequest, JobsUnavailable, LungserveError
from service.http.errors import http_error
from service.http.middleware import declares_body
from service.observability.job_metrics import JobMetrics
from service.observability.logs import REQUEST_ID_HEADER, RequestContext, new_request_id, request_context_from_scope

log = logging.getLogger(__name__)

JOBS_PREFIX: Final = "/jobs"
# A Unix connect is immediate unless front 0's accept backlog is full (it is overloaded).
CONNECT_TIMEOUT_S: Final = 10.0
# Hop-by-hop headers (RFC 9110 7.6.1) do not cross; Expect is this front's to answer; Origin is
# dropped so that CORS headers are added once, by this front; the rest this front sets itself.
_NOT_FORWARDED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"origin",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        REQUEST_ID_HEADER.lower().encode(),
    }
)
# uvicorn adds its own Server and Date to this front's answer: front 0's are not passed back.
_NOT_RETURNED: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
    | {b"server", b"date"}
)
# Dot segments are sent percent-encoded: httpx would resolve them, front 0's routing (on the
# decoded path, as this front's) sees the same path either way.
_DOT_SEGMENTS: Final = {b".": b"%2e", b"..": b"%2e%2e"}


@dataclass(frozen=True)
class JobsPlacement:
    """Where slide jobs run when `lungserve serve` has several fronts: front 0 (`owner`) runs them
    and serves the app on `socket` too; the other fronts forward /jobs there."""

    socket: Path
    owner: bool


def is_jobs_path(path: str) -> bool:
    return path == JOBS_PREFIX or path.startswith(JOBS_PREFIX + "/")


def private_socket(path: Path) -> socket.socket:
    """Front 0's private socket: bound, not listening. uvicorn listens on it once the app has
    started, so until then, and once this process is gone, a forwarding front is refused at
    once (a 503) instead of waiting in a backlog nobody accepts from."""
    path.unlink(missing_ok=True)  # a previous front 0's (it crashed, or was killed)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


class JobsLink:
    """This front's way to front 0: an HTTP client on its private socket."""

    def __init__(self, socket_path: Path, *, retry_after_s: int, metrics: JobMetrics | None = None) -> None:
        self.socket_path = socket_path
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._client = httpx.AsyncClient(
            # No pooled connections: a connection kept from a front 0 that has since restarted
            # would fail a request that a new one (a Unix connect: microseconds) serves.
            transport=httpx.AsyncHTTPTransport(
                uds=str(socket_path), limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
            ),
            # No read or write timeout: an upload is as slow as its client, and front 0 answers
            # within its own deadlines or goes away (then the socket closes).
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
            trust_env=False,  # never through an HTTP proxy from the environment
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = request_context_from_scope(scope)
        if ctx is None:  # RequestContextMiddleware sits outside: only a test without it
            ctx = RequestContext(new_request_id())
        body_read = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone  # httpx drops the connection: front 0 sees the hang-up
                chunk: bytes = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
            body_read.set()

        has_body = declares_body(scope)
        if not has_body:
            body_read.set()
        try:
            request = self._client.build_request(
                scope["method"],
                httpx.URL("http://front-0", raw_path=_target(scope)),
                headers=_request_headers(scope, ctx.request_id),
                content=body() if has_body else None,
            )
        except (httpx.InvalidURL, ValueError) as exc:
            await self._answer(scope, send, ctx, BadRequest(f"the request cannot be passed on: {exc}"))
            return
        exchange = _Exchange(self, request, scope, send, ctx)
        task = asyncio.ensure_future(exchange.run())
        watch = asyncio.ensure_future(_hang_up(receive, body_read))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not exchange.finished:
                task.cancel()  # the client went away: so does the request to front 0
            await asyncio.gather(task, return_exceptions=True)
        finally:
            for t in (task, watch):
                t.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, _ClientGone):
            raise failure

    async def _answer(self, scope: Scope, send: Send, ctx: RequestContext, exc: LungserveError) -> None:
        """An answer of this front's own (front 0 never saw the request): counted here."""
        ctx.forwarded = False
        if "route" not in scope:
            route = _route_of(scope)  # the access line and the count name the route, not "unmatched"
            if route is not None:
                scope["route"] = route
        err = http_error(exc, ctx.request_id)
        body = _json(err.body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class _Exchange:
    """One request to front 0 and its answer, relayed as they come."""

    def __init__(self, link: JobsLink, request: httpx.Request, scope: Scope, send: Send, ctx: RequestContext) -> None:
        self.link = link
        self.request = request
        self.scope = scope
        self.send = send
        self.ctx = ctx
        self.finished = False  # the whole answer is sent: a hang-up seen now is the normal end

    async def run(self) -> None:
        link, ctx = self.link, self.ctx
        ctx.forwarded = True  # from here front 0 may have it: front 0 counts it
        try:
            response = await link._client.send(self.request, stream=True)
        except httpx.LocalProtocolError as exc:
            await link._answer(self.scope, self.send, ctx, BadRequest(f"the request cannot be passed on: {exc}"))
            return
        except httpx.TransportError as exc:
            # Refused (front 0 is down or starting), or front 0 went away before answering.
            log.warning("slide jobs: front 0 is not answering (%s: %s)", type(exc).__name__, exc)
            if link.metrics is not None:
                link.metrics.forwarded("unavailable")
            await link._answer(
                self.scope,
                self.send,
                ctx,
                JobsUnavailable(
                    "slide jobs are unavailable for a moment (front 0, which runs them, is starting or "
                    "restarting); retry shortly",
                    retry_after_s=link.retry_after_s,
                ),
            )
            return
        if link.metrics is not None:
            link.metrics.forwarded("answered")
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _NOT_RETURNED]
            await self.send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            try:
                async for chunk in response.aiter_raw():
                    await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError as exc:
                # Front 0 went away in the middle of its answer: the client's connection can only
                # end short of it (uvicorn closes it), as with one process that dies.
                log.warning("slide jobs: front 0 went away while answering (%s)", type(exc).__name__)
                return
            self.finished = True
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


class _ClientGone(Exception):
    """The client hung up while its body was being passed on."""


async def _hang_up(receive: Receive, body_read: asyncio.Event) -> None:
    """Returns when the client hangs up (or once the answer is complete): read only after the body."""
    await body_read.wait()
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def _target(scope: Scope) -> bytes:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    path = b"/".join(_DOT_SEGMENTS.get(segment, segment) for segment in raw.split(b"/"))
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


def _request_headers(scope: Scope, request_id: str) -> list[tuple[bytes, bytes]]:
    headers = [(k, v) for k, v in scope["headers"] if k not in _NOT_FORWARDED]
    if not any(k == b"host" for k, _ in headers):
        # No Host (HTTP/1.0): a single process would build URLs from its own address.
        server = scope.get("server")
        if server is not None and server[1] is not None:
            headers.append((b"host", f"{server[0]}:{server[1]}".encode("latin-1")))
    headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode("latin-1")))
    headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
    client = scope.get("client")
    if client is not None:
        headers.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
    return headers


def _route_of(scope: Scope) -> BaseRoute | None:
    router = getattr(scope.get("app"), "router", None)
    routes: list[BaseRoute] = list(getattr(router, "routes", ()))
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
    return None


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class JobsForwarder:
    """ASGI middleware of a front that does not run slide jobs: /jobs goes to front 0."""

    def __init__(self, app: ASGIApp, link: JobsLink) -> None:
        self.app = app
        self.link = link

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_jobs_path(scope["path"]):
            await self.link.forward(scope, receive, send)
            return
        await self.app(scope, receive, send)


class TrustPrivateSocket:
    """Front 0: a request on its private socket comes from another front, which replaced the
    client's X-Forwarded-Proto and X-Forwarded-For with what it saw. Believed there only."""

    def __init__(self, app: ASGIApp, socket_path: Path) -> None:
        self.app = app
        self.socket_path = str(socket_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and tuple(server) == (self.socket_path, None):
            for name, value in scope["headers"]:
                if name == b"x-forwarded-proto" and value in (b"http", b"https"):
                    scope["scheme"] = value.decode("latin-1")
                elif name == b"x-forwarded-for":
                    scope["client"] = (value.decode("latin-1").strip(), 0)
        await self.app(scope, receive, send)
