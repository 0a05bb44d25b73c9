"""HTTP routes (response models in `service.http.schemas`). No business logic here.

The upload routes take the raw `Request` and parse the multipart body themselves
(`service.http.uploads`), so that the queue is checked before the body is read and every upload
limit answers with its own JSON error; `openapi_extra` describes the form for /docs.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, Request, Response

from service.core.admission import admitted_uploads
from service.core.decode_pool import PixelAllowance
from service.core.runtime import Classified, ImageReservation, ModelRuntime, ServiceState
from service.errors import LungserveError
from service.http.guards import deadline, unless_disconnected
from service.http.schemas import (
    ERROR_RESPONSES,
    BatchingInfo,
    DecisionInfo,
    ErrorResponse,
    FileError,
    FilePrediction,
    LiveResponse,
    ModelInfoResponse,
    ModelRef,
    PredictionResponse,
    PredictManyResponse,
    ReadyResponse,
    UploadLimitsInfo,
    file_error,
    file_prediction,
    multipart_body,
    prediction,
)
from service.http.uploads import RouteLimits, Upload, UploadLimits
from service.observability.metrics import Metrics

router = APIRouter()

# --- helpers --------------------------------------------------------------------------------


def _service(request: Request) -> ServiceState:
    service: ServiceState = request.app.state.service
    return service


def _limits(request: Request) -> RouteLimits:
    limits: RouteLimits = request.app.state.upload_limits
    return limits


async def _classify_upload(
    service: ServiceState,
    runtime: ModelRuntime,
    reservation: ImageReservation,
    upload: Upload,
    allowance: PixelAllowance,
) -> Classified | LungserveError:
    image = upload.error if upload.error is not None else upload.data
    return await service.classify_image(runtime, reservation, image, allowance)


def _uploads(
    request: Request, service: ServiceState, limits: UploadLimits
) -> AbstractAsyncContextManager[list[Upload]]:
    headers = request.headers
    return admitted_uploads(
        service, headers.get("content-type"), headers.get("content-length"), request.stream(), limits
    )


def _allowance(service: ServiceState) -> PixelAllowance:
    return PixelAllowance(service.settings.max_request_pixels)


# --- routes ---------------------------------------------------------------------------------


@router.post(
    "/predict",
    summary="Classify one image",
    description="Multipart field `file`: a JPEG, PNG, TIFF or BMP image.",
    response_model=PredictionResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=multipart_body("file", many=False),
)
async def predict(request: Request) -> Response:
    service = _service(request)
    settings = service.settings
    limits = _limits(request).predict
    try:
        # Order matters: readiness, declared size, queue and gate (503 at once), read, then the
        # queue slot (only now: a slow body never holds one), then decode.
        async with (
            deadline(settings.request_deadline_s),
            _uploads(request, service, limits) as (upload,),
        ):
            runtime = service.current()
            with runtime.reserve(1) as reservation:  # returns the slot if it is never submitted
                outcome = await unless_disconnected(
                    _classify_upload(service, runtime, reservation, upload, _allowance(service)), request.receive
                )
    except LungserveError as exc:
        service.observer.on_rejected(exc)  # HOOK(metrics/logs): the request failed as a whole
        raise
    if isinstance(outcome, LungserveError):
        raise outcome
    # Serialised once, by pydantic's compiled encoder, rather than validated again by FastAPI.
    return Response(prediction(outcome).model_dump_json(), media_type="application/json")


@router.post(
    "/predict-many",
    summary="Classify several images",
    description=(
        "Repeated multipart field `files`. Answers in upload order; a file that cannot be "
        "classified gets its own `error` and does not fail the others."
    ),
    response_model=PredictManyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=multipart_body("files", many=True),
)
async def predict_many(request: Request) -> Response:
    service = _service(request)
    settings = service.settings
    limits = _limits(request).predict_many
    try:
        async with deadline(settings.request_deadline_s), _uploads(request, service, limits) as uploads:
            # A hot reload may have swapped (and stopped) the runtime while the body was read:
            # admit into the one serving now, so no request fails because of a swap.
            runtime = service.current()
            allowance = _allowance(service)
            # The number of images is known only now -- still before any decode. All or nothing.
            with runtime.reserve(sum(1 for u in uploads if u.error is None)) as reservation:
                outcomes = await unless_disconnected(
                    asyncio.gather(*(_classify_upload(service, runtime, reservation, u, allowance) for u in uploads)),
                    request.receive,
                )
    except LungserveError as exc:
        service.observer.on_rejected(exc)
        raise
    results: list[FilePrediction | FileError] = [
        file_error(upload.filename, outcome)
        if isinstance(outcome, LungserveError)
        else file_prediction(upload.filename, outcome)
        for upload, outcome in zip(uploads, outcomes, strict=True)
    ]
    return Response(PredictManyResponse(results=results).model_dump_json(), media_type="application/json")


@router.get(
    "/metrics",
    summary="Prometheus metrics of this process",
    description="Prometheus text format; see docs/observability.md for what each metric means.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}},
)
async def metrics(request: Request) -> Response:
    collectors: Metrics = request.app.state.metrics
    body, content_type = collectors.exposition()
    return Response(content=body, media_type=content_type)


@router.get("/health/live", summary="The process is up")
async def live() -> LiveResponse:
    return LiveResponse()


@router.get(
    "/health/ready",
    summary="The model is loaded and warm",
    responses={503: {"model": ErrorResponse, "description": "loading, warming up or shutting down"}},
)
async def ready(request: Request) -> ReadyResponse:
    runtime = _service(request).ready()
    identity = runtime.identity
    return ReadyResponse(model=ModelRef(name=identity.name, version=identity.version), provider=runtime.engine.provider)


@router.get(
    "/model",
    summary="The model being served, its provider and the batching settings",
    responses={503: {"model": ErrorResponse, "description": "loading, warming up or shutting down"}},
)
async def model_info(request: Request) -> ModelInfoResponse:
    service = _service(request)
    runtime = service.current()
    s = service.settings
    return ModelInfoResponse(
        manifest=runtime.engine.manifest.dump(),
        provider=runtime.engine.provider,
        source=runtime.identity.as_dict(),
        batching=BatchingInfo(
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_s,
            queue_limit=s.queue_limit,
            max_in_flight_batches=s.max_in_flight_batches,
            request_deadline_s=s.request_deadline_s,
        ),
        limits=UploadLimitsInfo(
            max_file_bytes=s.max_file_bytes,
            max_files_per_request=s.max_files_per_request,
            max_request_bytes=s.max_request_bytes,
            max_image_pixels=s.max_image_pixels,
        ),
        decision=DecisionInfo(
            refer_below=runtime.thresholds.refer_below,
            ood_above=runtime.thresholds.ood_above,
            ood_score=runtime.engine.has_ood_score,
            tissue_check=runtime.thresholds.tissue_check,
        ),
    )
