"""Structured logs, request ids, the request context and the Server-Timing header.

`JsonFormatter` writes one JSON object per line; `configure_logging` is called once at start-up;
`RequestContext` (a context variable) carries a request's id and timings; the ASGI middleware
that sets it and writes the access line is `service.http.middleware.RequestContextMiddleware`.
Nothing here logs image content, file names or raw paths: they may hold patient identifiers
(docs/observability.md).
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # the supervisor logs through this module and imports no web framework
    from starlette.types import Scope

REQUEST_ID_HEADER: Final = "X-Request-ID"
MAX_REQUEST_ID_LEN: Final = 128
# RFC 9110 token characters plus ":", "/", "=" and "@" (trace ids, base64): safe to echo in
# a header and to write in a JSON log line. Anything else is replaced by a fresh id.
_REQUEST_ID_RE: Final = re.compile(rf"[A-Za-z0-9!#$%&'*+\-.^_`|~:/=@]{{1,{MAX_REQUEST_ID_LEN}}}")
UNMATCHED_ROUTE: Final = "unmatched"


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
    # Several fronts: front 0 (which runs slide jobs) received this request from this front
    # (service.http.jobs_forward), so it is front 0's to count and to write the access line of.
    forwarded: bool = False


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
    # Python warnings (Pillow's on damaged TIFF tags, say) become WARNING records in this format,
    # not bare lines on stderr that a JSON log pipeline cannot parse.
    logging.captureWarnings(True)
    # httpx's INFO line per request would double the access log of a front passing /jobs on to
    # front 0 (service.http.jobs_forward): front 0 writes that request's line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
