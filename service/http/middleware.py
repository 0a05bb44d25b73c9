"""Two small ASGI middlewares for hostile clients (issue 10): unread bodies, the admin port.

* `CloseUnreadBody`: a response sent before the request body was read to its end (an early
  400/413/415/503, a 404 to a POST) says `Connection: close`, so uvicorn closes the connection
  instead of keeping it open for the rest of a body nobody will read (row 12).
* `AdminPortSplit`: with `LUNGSERVE_ADMIN_PORT`, `/admin/*` and `/metrics` answer only on that
  port (bind it to a private interface or firewall it), and the public port answers 404 there.
"""

from __future__ import annotations

from typing import Final

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import NotFound
from service.http.errors import http_error

_ADMIN_PATHS = ("/admin/", "/metrics")
_BOTH_PORTS = ("/health/",)


def _declares_body(scope: Scope) -> bool:
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
        complete = not _declares_body(scope)

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
