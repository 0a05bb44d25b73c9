"""The browser page at `/`: static HTML, CSS and JavaScript from `service/http/page/`, no CDN.

The page talks to the same doors as any client (/predict, /explain, /analyze); the only thing
it gets from here besides its files is /page/config.json: the model's classes, the class
colours of the /analyze overlay (one palette, `service.pathology.overlay`), the tile size and the
model's published accuracy on unseen tissue groups, when its manifest has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from service.core.state import ServiceState
from service.model.manifest import Manifest
from service.pathology.overlay import class_colours

PAGE_DIR: Final = Path(__file__).resolve().parent / "page"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html; charset=utf-8")


@router.get("/page/config.json")
async def config(request: Request) -> dict[str, Any]:
    service: ServiceState = request.app.state.service
    model = service.current()
    manifest = model.manifest
    return {
        "model": {"name": manifest.name, "version": manifest.version},
        "provider": model.provider,
        "classes": list(manifest.classes),
        "colours": class_colours(manifest.classes),
        "tile_source_px": manifest.tile_px,
        "explain": manifest.cam_outputs(model.output_names) is not None,
        "estimate": _estimate(manifest),
    }


def _estimate(manifest: Manifest) -> dict[str, Any] | None:
    # Pathologists read the answers: the page says how often this model is right on tissue it
    # never saw (model.json `estimate`, docs/model/cv.md), or that no such figure exists.
    estimate = manifest.estimate
    if estimate is None:
        return None
    return {
        "accuracy": estimate.accuracy,
        "interval": list(estimate.interval),
        "method": estimate.method,
        "groups": estimate.groups,
    }


_files = StaticFiles(directory=PAGE_DIR)


@router.get("/page/{asset:path}")
async def page_file(request: Request, asset: str) -> Response:
    # After config.json (routes match in order); StaticFiles does the safe lookup and the types.
    return await _files.get_response(asset, request.scope)
