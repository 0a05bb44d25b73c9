"""Structured logs, request ids, the access-log middleware and the Server-Timing header.

* `JsonFormatter`: one JSON object per line -- ts, level, logger, msg, the request id of the
  request being served (if any) and every `extra=` field. A few lines of standard library
  instead of python-json-logger, which is not in the lock.
* `configure_logging(level, json)`: what `lungserve serve` calls once, at start-up.
* `RequestContextMiddleware`: a pure ASGI middleware. Starlette's `BaseHTTPMiddleware` runs
  the app in another task (so context variables set downstream are invisible upstream) and
  wraps `receive`, which interferes with streaming and with noticing a client disconnect --
  the signal the batcher uses to drop abandoned work. This one only wraps `send`.
  Per request it accepts or generates the request id, exposes a `RequestContext` through a
  context variable (and `scope["state"]`), echoes `X-Request-ID`, adds `Server-Timing` when
  the handler recorded timings, observes request count and duration, and writes ONE access
  line: request_id, method, route template, status, duration_s, batch ids and sizes,
  model version.

Nothing here ever logs image content, file names or raw paths: they may hold patient
identifiers. Routes are logged as their template (`/predict`), never the URL.
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER: Final = "X-Request-ID"
MAX_REQUEST_ID_LEN: Final = 128
# RFC 9110 token characters plus ":", "/", "=" and "@" (trace ids, base64): safe to echo in
# a header and to write in a JSON log line. Anything else is replaced by a fresh id.
_REQUEST_ID_RE: Final = re.compile(rf"[A-Za-z0-9!#$%&'*+\-.^_`|~:/=@]{{1,{MAX_REQUEST_ID_LEN}}}")
UNMATCHED_ROUTE: Final = "unmatched"
# Status recorded when the app sent no response because the client went away (nginx's 499).
CLIENT_CLOSED: Final = 499

access_logger = logging.getLogger("lungserve.access")


# --- request ids ------------------------------------------------------------------------


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The client's id if it is sane (<= 128 printable token characters), else a new one."""
    if value is not None and _REQUEST_ID_RE.fullmatch(value):
        return value
    return new_request_id()


# --- the per-request record the API fills ------------------------------------------------


@dataclass
class RequestTiming:
    """Where a prediction request's time went, for `Server-Timing` and the access log.

    A request may carry several images: decode time adds up (it is work this request
    caused), the queue wait is the longest of its images (the request waited for the
    slowest), and inference adds up over the distinct batches that carried its images.
    """

    queue_s: float = 0.0
    decode_s: float = 0.0
    inference_s: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)  # batch id -> batch size
    recorded: bool = False

    def add_decode(self, seconds: float) -> None:
        self.decode_s += seconds
        self.recorded = True

    def add_batch(self, batch_id: int, size: int, queue_wait_s: float, inference_s: float) -> None:
        """One image's batch: called once per image, counted once per batch."""
        self.queue_s = max(self.queue_s, queue_wait_s)
        if batch_id not in self.batches:
            self.batches[batch_id] = size
            self.inference_s += inference_s
        self.recorded = True


def server_timing(timing: RequestTiming) -> str:
    """`queue;dur=1.2, decode;dur=3.4, infer;dur=2.1` (milliseconds, per the spec)."""
    parts = (("queue", timing.queue_s), ("decode", timing.decode_s), ("infer", timing.inference_s))
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)


@dataclass
class RequestContext:
    """What the middleware knows about the request being served; handlers add to it."""

    request_id: str
    timing: RequestTiming = field(default_factory=RequestTiming)
    model_version: str | None = None
    images: int = 0
    api_key: str | None = None  # the caller's key *name* (service.http.access); never the key


_current: ContextVar[RequestContext | None] = ContextVar("lungserve_request", default=None)


def current_request() -> RequestContext | None:
    """The context of the request being served, or None outside a request."""
    return _current.get()


@contextmanager
def use_request(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make `ctx` the current request for the code inside (and the tasks it starts)."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def current_request_id() -> str | None:
    ctx = _current.get()
    return ctx.request_id if ctx is not None else None


def request_context_from_scope(scope: Scope) -> RequestContext | None:
    """The same object, from `request.scope` -- for code that runs outside the middleware's
    context (Starlette's 500 handler runs in `ServerErrorMiddleware`, outside it)."""
    ctx = scope.get("state", {}).get("request_context")
    return ctx if isinstance(ctx, RequestContext) else None


def route_template(scope: Scope) -> str:
    """The route's template (a path with `{parameters}`), not the URL: bounded, free of user data."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


# --- middleware ----------------------------------------------------------------------------


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
            if self.metrics is not None:
                self.metrics.observe_request(route, final_status, duration)
            access_logger.log(
                logging.DEBUG if route in self.quiet_routes else logging.INFO,
                "request",
                extra=_access_fields(ctx, scope["method"], route, final_status, duration),
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


# --- formatting ----------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with ANSI colour codes
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            out["request_id"] = request_id
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra (a Path, an enum) must not lose the whole line.
        return _json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal: the usual prefix, then extras as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extras(record)
        request_id = current_request_id()
        if request_id is not None:
            fields.setdefault("request_id", request_id)
        return line + "".join(f" {k}={v}" for k, v in fields.items())


def configure_logging(level: int | str = "INFO", json: bool = True) -> None:
    """Send every log record (ours, uvicorn's) to stderr, as JSON lines or plain text.

    Replaces the root handlers; uvicorn's loggers propagate to the root so their lines get
    the same format (run uvicorn with `log_config=None`). uvicorn's own access log is
    switched off: it logs the raw URL, and `RequestContextMiddleware` writes a better one.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
