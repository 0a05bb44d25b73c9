"""The slide-job door: POST /jobs, GET /jobs, GET/DELETE /jobs/{id}, and a done job's result.

A slide too large for one /analyze request (thousands of tiles, minutes of work) becomes a
job: the upload is spooled to disk and stored, or the job names an `s3://` object; the answer
is 202 at once and the client polls `status_url`. The work is the runner's
(`service.jobs.runner`); this module only parses, checks, and maps errors. API keys apply as
on every route, and a job is visible only to the key that created it (another key: 404).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.core.state import ServiceState
from service.errors import BadRequest, InvalidImage, LungserveError, ModelNotReady, RequestTooLarge, TooManyTiles
from service.http.schemas import ERROR_RESPONSES, AnalysisSummary, ErrorResponse, ModelRef, SourceInfo, TileAnswer
from service.http.uploads import MultipartBody, RouteLimits
from service.jobs.runner import JobRunner
from service.model.source.uri import parse_slide_uri
from service.observability.logs import request_context_from_scope
from service.pathology.jobs import Job, geojson
from service.pathology.slides import open_slide
from service.pathology.tiles import count_tiles

router = APIRouter(tags=["slide jobs"])

# {"uri": "s3://bucket/key"} is a few hundred bytes; a larger JSON body is not one.
MAX_JSON_BYTES: Final = 64 * 1024


class InvalidJobRequest(BadRequest):
    code = "invalid_job_request"
    status = 422


class JobProgress(BaseModel):
    tiles_done: int = Field(description="tiles of the grid processed (classified or skipped as background)")
    tiles_total: int = Field(description="tiles in the grid; 0 until the slide is opened")


class JobStatus(BaseModel):
    id: str
    status_url: str
    state: str = Field(description="queued | running | done | failed | cancelled")
    progress: JobProgress
    created: str = Field(description="ISO 8601, UTC")
    started: str | None = None
    finished: str | None = None
    error: str | None = Field(default=None, description="why the job failed")
    source: str = Field(description="upload | s3")


class JobList(BaseModel):
    jobs: list[JobStatus]


class JobResult(BaseModel):
    id: str
    width: int
    height: int
    tile_source_px: int
    input_size: int
    source: SourceInfo
    tiles: list[TileAnswer] = Field(description="every tissue tile, row by row, in slide pixels")
    summary: AnalysisSummary
    colours: dict[str, str]
    refer_colour: str
    model: ModelRef


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    extra: dict[int, dict[str, Any]] = {
        404: {"model": ErrorResponse, "description": "no such job for this API key"},
        409: {"model": ErrorResponse, "description": "the job is not in a state that allows this"},
    }
    return {**ERROR_RESPONSES, **{c: extra[c] for c in codes}}


_SUBMIT_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "minLength": 1}},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["uri"],
                    "properties": {"uri": {"type": "string", "pattern": "^s3://[a-z0-9.-]{3,63}/[^?#]*[^/?#]$"}},
                }
            },
        },
    }
}


def _runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.jobs
    return runner


def _owner(request: Request) -> str | None:
    """The API key's name (None when the server has no keys: then every caller shares the jobs)."""
    ctx = request_context_from_scope(request.scope)
    return ctx.api_key if ctx is not None else None


def _status(request: Request, job: Job) -> JobStatus:
    return JobStatus.model_validate(job.status(str(request.url_for("job_status", job_id=job.id))))


@router.post(
    "/jobs",
    status_code=202,
    summary="Submit a whole slide as a job",
    description=(
        "Multipart field `file` (a slide: pyramidal or tiled TIFF, SVS, NDPI, ... through OpenSlide, or a plain "
        'image), or JSON `{"uri": "s3://bucket/key"}` read with the server\'s S3 settings. Answers 202 at once; '
        "poll `status_url`."
    ),
    responses=_errors(),
    openapi_extra=_SUBMIT_BODY,
)
async def submit_job(request: Request, response: Response) -> JobStatus:
    service: ServiceState = request.app.state.service
    runner = _runner(request)
    await runner.ready()
    owner = _owner(request)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if media == "application/json":
            job = await runner.submit(owner, await _uri_of(request))
        else:
            path = await _spooled_slide(service, runner, request)
            try:
                await _check_slide(service, path)
                job = await runner.submit(owner, "upload", path)
            finally:
                await asyncio.to_thread(path.unlink, missing_ok=True)
    except LungserveError as exc:
        service.observer.on_rejected(exc)
        raise
    status = _status(request, job)
    response.headers["Location"] = status.status_url
    return status


async def _uri_of(request: Request) -> str:
    service: ServiceState = request.app.state.service
    service.current()  # 503 while not ready, as every door
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise RequestTooLarge(f"a job's JSON body is at most {MAX_JSON_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJobRequest(f"the body is not JSON: {exc}") from None
    uri = document.get("uri") if isinstance(document, dict) else None
    if not isinstance(uri, str):
        raise InvalidJobRequest('expected {"uri": "s3://bucket/key"}')
    try:
        parse_slide_uri(uri)
    except ValueError as exc:
        raise InvalidJobRequest(f"uri: {exc}") from None
    return uri.strip()


async def _spooled_slide(service: ServiceState, runner: JobRunner, request: Request) -> Path:
    """The upload, written to disk as it arrives (never held in memory)."""
    route_limits: RouteLimits = request.app.state.upload_limits
    limits = route_limits.slide
    path = runner.spool_dir() / f"upload-{uuid.uuid4().hex}"
    handles: list[BinaryIO] = []

    def spool() -> BinaryIO:
        if handles:  # max_files=1: the reader refuses a second file before asking for it
            raise BadRequest("one file per job")
        handles.append(path.open("w+b"))
        return handles[0]

    try:
        # Every door's way in; a job does not need room in the queue now (it waits, queued).
        async with service.admit(MultipartBody.of(request, limits, spool), needs_queue=False):
            pass
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    finally:
        for handle in handles:
            handle.close()
    return path


async def _check_slide(service: ServiceState, path: Path) -> None:
    """The header only: a file that is no slide, or too large a one, is refused now (4xx), not later."""
    settings = service.settings
    decoder = service.decoder
    if decoder is None:
        raise ModelNotReady("the server is not started")
    manifest = service.current().manifest
    side = manifest.tile_px
    if (await asyncio.to_thread(path.stat)).st_size == 0:
        raise InvalidImage("the file is empty")
    loop = asyncio.get_running_loop()
    slide = await loop.run_in_executor(
        decoder.pool,
        partial(
            open_slide,
            path,
            max_pixels=settings.max_image_pixels,
            tile_px=side,
            size=manifest.input_size,
            max_tile_pixels=settings.large_image_pixels,  # the stored tiles a slide claims, as /analyze
        ),
    )
    try:
        count = count_tiles(slide.width, slide.height, side)
    finally:
        slide.close()
    if count > settings.jobs_max_tiles:
        raise TooManyTiles(
            f"the slide is {slide.width}x{slide.height} px: {count} tiles of {side} px, more than "
            f"LUNGSERVE_JOBS_MAX_TILES ({settings.jobs_max_tiles})"
        )


@router.get("/jobs", summary="The caller's slide jobs, newest first", responses=_errors())
async def list_jobs(request: Request) -> JobList:
    runner = _runner(request)
    await runner.ready()
    return JobList(jobs=[_status(request, job) for job in runner.list(_owner(request))])


@router.get("/jobs/{job_id}", name="job_status", summary="A slide job's state and progress", responses=_errors(404))
async def job_status(request: Request, job_id: str) -> JobStatus:
    runner = _runner(request)
    await runner.ready()
    return _status(request, runner.get(_owner(request), job_id))


@router.delete("/jobs/{job_id}", summary="Cancel a queued or running slide job", responses=_errors(404, 409))
async def cancel_job(request: Request, job_id: str) -> JobStatus:
    runner = _runner(request)
    await runner.ready()
    return _status(request, await runner.cancel(_owner(request), job_id))


@router.get(
    "/jobs/{job_id}/result",
    summary="A done job's tiles and summary (the shape of /analyze)",
    response_model=JobResult,
    responses=_errors(404, 409),
)
async def job_result(request: Request, job_id: str) -> Response:
    runner = _runner(request)
    await runner.ready()
    data = await runner.artefact(_owner(request), job_id, "result.json")
    return Response(data, media_type="application/json")


@router.get(
    "/jobs/{job_id}/result.geojson",
    summary="A done job's tiles as GeoJSON for QuPath (File > Import objects)",
    responses={
        200: {"content": {"application/geo+json": {"schema": {"type": "object"}}}, "description": "FeatureCollection"},
        **_errors(404, 409),
    },
    response_class=JSONResponse,
)
async def job_geojson(request: Request, job_id: str) -> JSONResponse:
    runner = _runner(request)
    await runner.ready()
    result = json.loads(await runner.artefact(_owner(request), job_id, "result.json"))
    collection = await asyncio.to_thread(geojson, job_id, result["tiles"], result["colours"], result["refer_colour"])
    return JSONResponse(
        collection,
        media_type="application/geo+json",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}.geojson"'},
    )


@router.get(
    "/jobs/{job_id}/classmap.png",
    summary="A done job's class map over a picture of the slide",
    responses={200: {"content": {"image/png": {}}, "description": "PNG"}, **_errors(404, 409)},
    response_class=Response,
)
async def job_classmap(request: Request, job_id: str) -> Response:
    runner = _runner(request)
    await runner.ready()
    return Response(await runner.artefact(_owner(request), job_id, "classmap.png"), media_type="image/png")
