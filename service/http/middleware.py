"""The ASGI middlewares: the request context and access log, and three for hostile clients.

* `RequestContextMiddleware`: request id, Server-Timing, request metrics, one access line
  (pure ASGI, so a client disconnect stays visible; docs/observability.md).
* `CloseUnreadBody`: a response sent before the request body was read to its end says
  `Connection: close`, so a client cannot hold the connection open with a body nobody reads.
* `AdminPortSplit`: with `LUNGSERVE_ADMIN_PORT`, `/admin/*` and `/metrics` answer only on that
  port, and the public port answers 404 there (docs/reliability.md).
* `SecurityHeaders`: nosniff, no framing, a referrer policy and a CSP on every answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final, Protocol

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import NotFound
from service.http.errors import http_error
from service.observability.logs import (
    REQUEST_ID_HEADER,
    RequestContext,
    accept_request_id,
    route_template,
    server_timing,
    use_request,
)

# Status recorded when the app sent no response because the client went away (nginx's 499).
CLIENT_CLOSED: Final = 499

access_logger = logging.getLogger("lungserve.access")

_ADMIN_PATHS = ("/admin/", "/metrics")
_BOTH_PORTS = ("/health/",)


def declares_body(scope: Scope) -> bool:
    """Whether the request has a body to read (a length above 0, or chunked)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


class CloseUnreadBody:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = not declares_body(scope)

        async def tracking_receive() -> Message:
            nonlocal complete
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracking_receive, closing_send)


class AdminPortSplit:
    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        server = scope.get("server")
        on_admin_port = server is not None and server[1] == self.admin_port
        admin_path = path.startswith(_ADMIN_PATHS) or path == "/admin"
        if admin_path != on_admin_port and not path.startswith(_BOTH_PORTS):
            where = "the admin port" if admin_path else "the public port"
            err = http_error(NotFound(f"no route {scope.get('method', '')} {path} here; it is served on {where}"))
            await JSONResponse(err.body, status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- request context, access log ----------------------------------------------------------------------------


class RequestObserver(Protocol):
    """What the middleware needs from `service.observability.metrics.Metrics`."""

    def observe_request(self, route: str, status: int, duration_s: float) -> None: ...


class RequestContextMiddleware:
    """Request id, Server-Timing, request metrics and one access-log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: RequestObserver | None = None,
        quiet_routes: frozenset[str] = frozenset({"/metrics"}),
    ) -> None:
        self.app = app
        self.metrics = metrics
        # Scrapes and probes every few seconds would drown the access log: DEBUG for them.
        self.quiet_routes = quiet_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        raw_id = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        ctx = RequestContext(accept_request_id(raw_id.decode("latin-1") if raw_id is not None else None))
        scope.setdefault("state", {})["request_context"] = ctx
        status: int | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = ctx.request_id
                if ctx.timing.recorded:
                    headers["Server-Timing"] = server_timing(ctx.timing)
            await send(message)

        try:
            with use_request(ctx):
                await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette's ServerErrorMiddleware (outside this one) answers 500 and logs it.
            status = status if status is not None else 500
            raise
        except BaseException:  # cancelled: the client or the server went away
            status = status if status is not None else CLIENT_CLOSED
            raise
        finally:
            duration = time.perf_counter() - start
            route = route_template(scope)
            final_status = status if status is not None else 500
            fields = _access_fields(ctx, scope["method"], route, final_status, duration)
            if ctx.forwarded:
                # Front 0 served it: its own line and count are the request's (one of each, not
                # two); this front's line is only for debugging the hop.
                fields["forwarded_to"] = "front 0"
                access_logger.debug("request", extra=fields)
            else:
                if self.metrics is not None:
                    self.metrics.observe_request(route, final_status, duration)
                access_logger.log(
                    logging.DEBUG if route in self.quiet_routes else logging.INFO, "request", extra=fields
                )


def _access_fields(ctx: RequestContext, method: str, route: str, status: int, duration: float) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": ctx.request_id,
        "method": method,
        "route": route,
        "status": status,
        "duration_s": round(duration, 6),
    }
    if ctx.images:
        fields["images"] = ctx.images
    t = ctx.timing
    if t.batches:
        fields["batch_ids"] = list(t.batches)
        fields["batch_sizes"] = list(t.batches.values())
    if t.recorded:
        fields["queue_s"] = round(t.queue_s, 6)
        fields["decode_s"] = round(t.decode_s, 6)
        fields["inference_s"] = round(t.inference_s, 6)
    if ctx.model_version is not None:
        fields["model_version"] = ctx.model_version
    if ctx.api_key is not None:
        fields["api_key"] = ctx.api_key
    return fields


# Every answer may be shown by a browser: the page and /docs (which hold an API key or admin
# token while open), and JSON or PNG that must never be sniffed into HTML. Scripts and styles are
# this server's own files (no CDN); /docs and /redoc add the hashes of their inline start-up
# scripts (service.http.docs). Styles may be inline: ReDoc injects <style> elements at run time.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'{scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.format(scripts="").encode()),
)


def content_security_policy(script_hashes: tuple[str, ...] = ()) -> str:
    """The policy, with `'sha256-...'` sources for a page's own inline scripts."""
    return CONTENT_SECURITY_POLICY.format(scripts="".join(f" '{h}'" for h in script_hashes))


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
