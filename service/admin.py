"""Admin routes: `POST /admin/reload`. Disabled (404) unless `LUNGSERVE_ADMIN_TOKEN` is set."""

from __future__ import annotations

import secrets
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.errors import NotFound, Unauthorized
from service.reload import ModelReloader
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


def _authorize(request: Request) -> None:
    settings: Settings = request.app.state.service.settings
    token = settings.admin_token
    if token is None:
        # No token configured: the admin API does not exist.
        raise NotFound(f"no route {request.method} {request.url.path}")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
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
        401: {"description": "missing or wrong admin token"},
        404: {"description": "admin API disabled (no admin token configured)"},
        409: {"description": "the new model was refused; the old one keeps serving"},
        503: {"description": "not ready yet, or shutting down"},
    },
)
async def reload_model(request: Request) -> ReloadResponse:
    _authorize(request)
    reloader: ModelReloader = request.app.state.reloader
    result = await reloader.reload()
    return ReloadResponse(
        status="reloaded" if result.changed else "unchanged",
        previous=result.previous.as_dict(),
        current=result.current.as_dict(),
    )
