"""POST /analyze: a large image tiled at the training scale into a class map.

The door; the core is `service.pathology.class_map`. The upload goes to a temporary file, all
its tiles are admitted at once before any is decoded (503 when the queue cannot take them now,
413 when it never could), then flow through the shared batcher like /predict (docs/pathology.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import BinaryIO, Final

from fastapi import APIRouter, Request
from PIL import Image

from service.core import memory
from service.core.model_client import Classified, ModelClient, Pixels, Slots
from service.core.pipeline import Outcome
from service.core.state import ServiceState
from service.errors import InvalidImage, ModelNotReady, TooManyTiles
from service.http.guards import guarded, unless_disconnected
from service.http.schemas import (
    ERROR_RESPONSES,
    AnalysisSummary,
    AnalyzeResponse,
    ErrorResponse,
    ModelRef,
    SourceInfo,
    TileAnswer,
    b64,
    error_examples,
    multipart_body,
)
from service.http.uploads import (
    MultipartBody,
    RouteLimits,
    check_spool_room,
    close_spooled,
    spool_error,
)
from service.pathology.class_map import TileOutcome, class_map
from service.pathology.overlay import TileMark, class_colours, class_map_overlay, png_bytes
from service.pathology.slides import Slide, open_slide
from service.pathology.tiles import count_tiles, tile_grid

router = APIRouter()

# Longer side of the /analyze class-map overlay and thumbnail PNGs.
CLASS_MAP_MAX_SIDE: Final = 1024


def decision_of(result: Classified) -> tuple[str, str | None]:
    """The refer decision the runtime made beside the model's output (service.model.decision)."""
    return result.decision.decision, result.decision.reason


async def classify_tile(service: ServiceState, model: ModelClient, slots: Slots, image: Pixels) -> Classified:
    with Outcome(service.observer) as outcome:  # a cancelled tile counts as abandoned
        return outcome.classified(*await model.infer(slots, image))


def _summary(classes: list[str], outcomes: list[TileOutcome[Classified]]) -> AnalysisSummary:
    tissue = [o.result for o in outcomes if o.result is not None]
    by_class = Counter(r.label for r in tissue)
    counts = {c: by_class.get(c, 0) for c in classes}
    return AnalysisSummary(
        tiles=len(outcomes),
        tissue_tiles=len(tissue),
        background_tiles=len(outcomes) - len(tissue),
        referred_tiles=sum(1 for r in tissue if decision_of(r)[0] == "refer"),
        tissue_tiles_by_class=counts,
        tissue_share={c: (n / len(tissue) if tissue else 0.0) for c, n in counts.items()},
    )


def _pictures(
    slide: Slide, outcomes: list[TileOutcome[Classified]], colours: dict[str, str]
) -> tuple[bytes, bytes, tuple[int, int]]:
    """(overlay PNG, thumbnail PNG, their size): blocking, runs in the decode pool."""
    thumb: Image.Image = slide.thumbnail(CLASS_MAP_MAX_SIDE)
    marks = [
        TileMark(o.tile, o.result.label, refer=decision_of(o.result)[0] == "refer")
        for o in outcomes
        if o.result is not None
    ]
    overlay = class_map_overlay(thumb, (slide.width, slide.height), marks, colours)
    return png_bytes(overlay), png_bytes(thumb), overlay.size


@router.post(
    "/analyze",
    summary="Tile a large image at the model's scale and map the classes",
    description=(
        "Multipart field `file`: a JPEG, PNG or TIFF larger than a tile (up to `MAX_IMAGE_PIXELS`), or a "
        "pyramidal TIFF / whole-slide file read through OpenSlide when the `slides` extra is installed. "
        "Tiles of `tile_source_px` source pixels (from the model manifest, 768 for LC25000) are classified "
        "through the shared batcher; mostly white tiles are skipped and counted. Answers the per-tile map, "
        "a summary and the class map as a PNG overlay (base64)."
    ),
    responses={
        **ERROR_RESPONSES,
        507: {
            "model": ErrorResponse,
            "description": "the upload does not fit on the server's temporary disk (TMPDIR)",
            "content": error_examples(
                ("insufficient_storage", "no space left for the upload on the server's temporary disk (TMPDIR)")
            ),
        },
    },
    openapi_extra=multipart_body("file", many=False),
)
async def analyze(request: Request) -> AnalyzeResponse:
    service: ServiceState = request.app.state.service
    settings = service.settings
    route_limits: RouteLimits = request.app.state.upload_limits
    limits = route_limits.slide
    loop = asyncio.get_running_loop()
    try:
        spool_root = tempfile.TemporaryDirectory(prefix="lungserve-analyze-")
    except OSError as exc:  # a spool disk without a free inode: the same 507 as without a free block
        raise spool_error(exc) from exc
    with spool_root as spool_dir:
        spooled: list[BinaryIO] = []

        def spool() -> BinaryIO:
            handle = (Path(spool_dir) / f"upload-{len(spooled)}").open("w+b")
            spooled.append(handle)
            return handle

        slide: Slide | None = None
        try:
            decoder = service.decoder
            if decoder is None:
                raise ModelNotReady("the server is not started")
            pool = decoder.pool
            # The size the body claims against the room on the spool disk, before a byte is read.
            check_spool_room(spool_dir, request.headers.get("content-length"))
            # Every door's way in, with the body going to disk instead of memory.
            async with guarded(service), service.admit(MultipartBody.of(request, limits, spool)):
                for handle in spooled:
                    close_spooled(handle)
                model = service.current()  # a reload may have swapped it while the body came in
                manifest = model.manifest
                size, side = manifest.input_size, manifest.tile_px
                path = Path(spool_dir) / "upload-0"
                if path.stat().st_size == 0:
                    raise InvalidImage("the file is empty")
                # Opening reads the header (and a JPEG's markers): sizes the file claims, checked first.
                slide = await loop.run_in_executor(
                    pool,
                    partial(
                        open_slide,
                        path,
                        max_pixels=settings.max_image_pixels,
                        tile_px=side,
                        size=size,
                        max_tile_pixels=settings.large_image_pixels,
                    ),
                )
                # The tile count from the claimed size by arithmetic, before the grid or any pixel.
                count = count_tiles(slide.width, slide.height, side)
                if count > model.queue_limit:
                    raise TooManyTiles(
                        f"the image is {slide.width}x{slide.height} px: {count} tiles of {side} px, more than "
                        f"the {model.queue_limit} this server admits at once (LUNGSERVE_QUEUE_LIMIT)"
                    )
                # A plain image is decoded whole, in the large-image lane.
                await loop.run_in_executor(decoder.large_lane, slide.prepare)
                tiles = tile_grid(slide.width, slide.height, side)
                # One admission for every tile, before any tile is decoded.
                with model.reserve(len(tiles)) as slots:
                    outcomes = await unless_disconnected(
                        class_map(
                            slide,
                            tiles,
                            size=size,
                            pool=pool,
                            classify=partial(classify_tile, service, model, slots),
                            window=settings.max_batch_size * settings.max_in_flight_batches,
                        ),
                        request.receive,
                    )
                colours = class_colours(manifest.classes)
                overlay, thumbnail, (width, height) = await loop.run_in_executor(
                    pool, _pictures, slide, outcomes, colours
                )
                source = SourceInfo(**slide.describe())
                image_size = (slide.width, slide.height)
        finally:
            for handle in spooled:
                with contextlib.suppress(OSError):  # answered already; a full disk said so above
                    handle.close()
            if slide is not None:
                slide.close()
                memory.trim()  # a large image's pixels go back to the system, not just to the heap
    return AnalyzeResponse(
        width=image_size[0],
        height=image_size[1],
        tile_source_px=side,
        input_size=size,
        source=source,
        tiles=[_tile_answer(o) for o in outcomes if o.result is not None],
        summary=_summary(manifest.classes, outcomes),
        colours=colours,
        overlay_png=b64(overlay),
        thumbnail_png=b64(thumbnail),
        overlay_width=width,
        overlay_height=height,
        model=ModelRef(name=manifest.name, version=manifest.version),
    )


def _tile_answer(outcome: TileOutcome[Classified]) -> TileAnswer:
    result = outcome.result
    assert result is not None
    decision, reason = decision_of(result)
    t = outcome.tile
    return TileAnswer(
        x=t.x,
        y=t.y,
        width=t.width,
        height=t.height,
        label=result.label,
        confidence=result.confidence,
        probabilities=result.by_class(),
        decision=decision,
        reason=reason,
    )
