"""Domain errors as HTTP answers: the one error body, the app's exception handlers, and the same
body written raw by the connection guards (`service.http.server`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import JobsUnavailable, LungserveError, Overloaded, TooManyRequests, Unauthorized
from service.observability.logs import request_context_from_scope

# Routes of the Open Inference Protocol: their errors keep the protocol's `{"error": "message"}`.
OIP_PREFIX: Final = "/v2"

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """`{"error": {"code", "message", "request_id"}}`: every error lungserve answers has it."""
    error: dict[str, Any] = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def http_error(exc: LungserveError, request_id: str | None = None, *, oip: bool = False) -> HttpError:
    """The one place where a domain error becomes an HTTP answer.

    `oip`: the Open Inference Protocol's shape, `{"error": "message"}` (routes under /v2);
    same status and headers.
    """
    headers: dict[str, str] = {}
    if isinstance(exc, (Overloaded, TooManyRequests, JobsUnavailable)):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    body = {"error": exc.message} if oip else error_body(exc.code, exc.message, request_id)
    return HttpError(status=exc.status, body=body, headers=headers)


# gRPC status code names (grpc.StatusCode members) by HTTP status: the OIP gRPC door's side
# of the same mapping. Names, not grpc objects: this module imports no framework.
_GRPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    507: "RESOURCE_EXHAUSTED",
}


def grpc_status(exc: LungserveError) -> str:
    """The gRPC status of a domain error (its message goes in the status details)."""
    return _GRPC_STATUS.get(exc.status, "INTERNAL")


def raw_json_response(status: int, code: str, message: str, reason: str, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with the error body, for answers written before the app runs;
    the connection closes after it."""
    body = json.dumps(error_body(code, message)).encode()
    retry = f"retry-after: {retry_after_s}\r\n" if retry_after_s is not None else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\n{retry}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _request_id(request: Request) -> str | None:
    ctx = request_context_from_scope(request.scope)
    return ctx.request_id if ctx is not None else None


def _json_error(request: Request, exc: LungserveError) -> JSONResponse:
    # OIP clients (tritonclient, KServe) read `{"error": "message"}`: every answer under /v2 has it.
    path = request.url.path.removeprefix(str(request.scope.get("root_path", "")).rstrip("/"))
    oip = path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")
    err = http_error(exc, _request_id(request), oip=oip)
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LungserveError)
        return _json_error(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        )
        error = LungserveError(f"invalid request: {problems}")
        error.code, error.status = "validation_error", 422
        return _json_error(request, error)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = LungserveError(str(exc.detail))
        error.code, error.status = _HTTP_CODES.get(exc.status_code, "http_error"), exc.status_code
        response = _json_error(request, error)
        for name, value in (exc.headers or {}).items():  # e.g. Allow on 405
            response.headers[name] = value
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware calls this and then re-raises, so the server
        # still logs the traceback; the client gets the usual JSON shape, without details.
        return _json_error(request, LungserveError("internal server error"))

    app.add_exception_handler(LungserveError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
