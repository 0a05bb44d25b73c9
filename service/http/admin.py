"""Admin routes: `POST /admin/reload`. Disabled (404) unless `LUNGSERVE_ADMIN_TOKEN` is set."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from service.core.reload import ModelReloader
from service.errors import NotFound, TooManyRequests, Unauthorized
from service.http.schemas import ErrorResponse, error_examples
from service.settings import Settings

router = APIRouter(prefix="/admin")

_IDENTITY_EXAMPLE: dict[str, Any] = {
    "name": "lungserve-lung-cnn",
    "version": "2026.11.22-6d5d6424",
    "sha256": "3bac5ccbc40988d79ae65006ed90f93224bff555b21c9786a7b845e5bf745e0d",
    "source": "s3://models/lung/",
    "etag": "9b2cf535f27731c974343645a3985328",
    "version_id": None,
}


class ReloadResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "reloaded",
                    "previous": _IDENTITY_EXAMPLE,
                    "current": {**_IDENTITY_EXAMPLE, "version": "2026.12.01-0a1b2c3d"},
                }
            ]
        }
    )
    status: Literal["reloaded", "unchanged"] = Field(description="unchanged: the source holds the model being served")
    previous: dict[str, str | None] = Field(description="the model served before the call")
    current: dict[str, str | None] = Field(description="the model served now")


_WINDOW_S: Final = 60.0
_MAX_CLIENTS_TRACKED: Final = 4096


class AuthFailures:
    """Failed admin authentications per client address in the last minute (guessing the token
    costs a minute per `limit` tries). Bounded: the least recently failing clients are forgotten."""

    def __init__(self, limit: int, clock: Any = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float]:
        now = self._clock()
        times = self._by_client.get(client, deque())
        while times and now - times[0] >= _WINDOW_S:
            times.popleft()
        return times

    def check(self, client: str) -> None:
        times = self._recent(client)
        if len(times) >= self.limit:
            retry = max(1, int(_WINDOW_S - (self._clock() - times[0])) + 1)
            raise TooManyRequests(
                f"too many failed admin authentications from this address; retry in {retry} s", retry_after_s=retry
            )

    def record(self, client: str) -> None:
        times = self._recent(client)
        times.append(self._clock())
        self._by_client[client] = times
        self._by_client.move_to_end(client)
        while len(self._by_client) > _MAX_CLIENTS_TRACKED:
            self._by_client.popitem(last=False)


# Declares the scheme in OpenAPI (Swagger's Authorize button); `_authorize` does the checking,
# so a missing token still answers in lungserve's JSON shape.
_ADMIN_BEARER = HTTPBearer(
    scheme_name="adminToken",
    description="LUNGSERVE_ADMIN_TOKEN (the admin API answers 404 when it is not set)",
    auto_error=False,
)


def _authorize(request: Request) -> None:
    settings: Settings = request.app.state.service.settings
    token = settings.admin_token
    if token is None:
        # No token configured: the admin API does not exist.
        raise NotFound(f"no route {request.method} {request.url.path}")
    failures: AuthFailures = request.app.state.admin_auth_failures
    client = request.client.host if request.client is not None else "unknown"
    failures.check(client)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
        failures.record(client)
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <LUNGSERVE_ADMIN_TOKEN>'")


@router.post(
    "/reload",
    summary="Fetch, verify and warm the model at the configured URI, then swap it in",
    description=(
        "Needs `Authorization: Bearer <admin token>`; 404 when no admin token is configured. "
        "The new model is verified and warmed beside the serving one; requests in flight finish "
        "on the old model. A model that fails verification is refused (409) and the old one keeps serving."
    ),
    responses={
        401: {
            "model": ErrorResponse,
            "description": "missing or wrong admin token",
            "content": error_examples(
                ("unauthorized", "admin endpoints need 'Authorization: Bearer <LUNGSERVE_ADMIN_TOKEN>'")
            ),
        },
        404: {
            "model": ErrorResponse,
            "description": "admin API disabled (no admin token configured)",
            "content": error_examples(("not_found", "no route POST /admin/reload")),
        },
        409: {
            "model": ErrorResponse,
            "description": "the new model was refused; the old one keeps serving",
            "content": error_examples(
                ("model_rejected", "checksum mismatch: model.onnx has sha256 3bac5c..., the manifest says 9b2cf5...")
            ),
        },
        503: {
            "model": ErrorResponse,
            "description": "not ready yet, or shutting down",
            "content": error_examples(
                ("model_not_ready", "the model is still loading or warming up"),
                ("shutting_down", "the server is shutting down"),
            ),
        },
        429: {
            "model": ErrorResponse,
            "description": "too many failed authentications from this address (Retry-After)",
            "content": error_examples(
                ("too_many_requests", "too many failed admin authentications from this address; retry in 42 s")
            ),
        },
    },
)
async def reload_model(
    request: Request, _token: Annotated[HTTPAuthorizationCredentials | None, Security(_ADMIN_BEARER)]
) -> ReloadResponse:
    _authorize(request)
    reloader: ModelReloader = request.app.state.reloader
    result = await reloader.reload()
    return ReloadResponse(
        status="reloaded" if result.changed else "unchanged",
        previous=result.previous.as_dict(),
        current=result.current.as_dict(),
    )
