"""Interactive API docs (/docs, /redoc) served entirely from this process.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so they are blank offline. This
is FastAPI's documented self-hosting: the same HTML generators, pointed at the copies vendored
in `service/http/static/` (see its README for versions and licenses), served under `ASSETS_PATH`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from service.http.access import is_open
from service.http.middleware import content_security_policy

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
ASSETS_PATH: Final = "/docs-assets"
OPENAPI_PATH: Final = "/openapi.json"
DOCS_PATH: Final = "/docs"
REDOC_PATH: Final = "/redoc"
OAUTH2_REDIRECT_PATH: Final = "/docs/oauth2-redirect"


API_KEY_SCHEMES: Final[dict[str, dict[str, Any]]] = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "a key from LUNGSERVE_API_KEYS_FILE, as `Authorization: Bearer KEY`",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "a key from LUNGSERVE_API_KEYS_FILE, as `X-API-Key: KEY`",
    },
}


# FastAPI's page generators start Swagger UI and ReDoc with an inline <script>.
_INLINE_SCRIPT: Final = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL)


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    """The page with the security policy that allows exactly its own inline scripts (by hash)."""
    html = bytes(page.body).decode()
    hashes = tuple(
        "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        for script in _INLINE_SCRIPT.findall(html)
    )
    page.headers["Content-Security-Policy"] = content_security_policy(hashes)
    return page


router = APIRouter(include_in_schema=False)
_assets = StaticFiles(directory=STATIC_DIR)


# Routes, not FastAPI's built-in /openapi.json and a Mount: only routes of FastAPI's own kind
# carry their template to the request metrics, which would count these as "unmatched". The app is
# built with `openapi_url=None, docs_url=None, redoc_url=None`.
@router.get(OPENAPI_PATH)
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get(ASSETS_PATH + "/{asset:path}")
async def docs_asset(request: Request, asset: str) -> Response:
    # StaticFiles does the safe lookup (no escaping the folder), caching headers and types.
    return await _assets.get_response(asset, request.scope)


def _root(request: Request) -> str:
    # Behind a proxy that strips a prefix (root_path), every URL keeps that prefix.
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get(DOCS_PATH)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return _with_csp(
        get_swagger_ui_html(
            openapi_url=root + OPENAPI_PATH,
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/swagger-ui/favicon-32x32.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_PATH,
            # Keep a pasted admin token or API key across reloads of the page.
            swagger_ui_parameters={"persistAuthorization": True},
        )
    )


@router.get(OAUTH2_REDIRECT_PATH)
async def swagger_ui_redirect() -> HTMLResponse:
    return _with_csp(get_swagger_ui_oauth2_redirect_html())


@router.get(REDOC_PATH)
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return _with_csp(
        get_redoc_html(
            openapi_url=root + OPENAPI_PATH,
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
    )


def declare_api_keys(app: FastAPI) -> None:
    """The OpenAPI document declares the API key schemes on the routes that need one."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(API_KEY_SCHEMES)
        for path, operations in schema.get("paths", {}).items():
            if is_open(path):
                continue
            for operation in operations.values():
                # Either scheme will do (a list of alternatives).
                operation["security"] = [{"apiKey": []}, {"apiKeyHeader": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
