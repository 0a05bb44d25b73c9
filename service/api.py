"""HTTP routes (response models in `service.schemas`). No business logic here.

The upload routes take the raw `Request` and parse the multipart body themselves
(`service.uploads`), so that the queue is checked before the body is read and every upload
limit answers with its own JSON error; `openapi_extra` describes the form for /docs.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

from fastapi import APIRouter, Request, Response

from service.admission import admitted_uploads
from service.decoder import PixelAllowance
from service.errors import LungserveError
from service.http_guards import deadline, unless_disconnected
from service.metrics import Metrics
from service.runtime import Classified, ImageReservation, ModelRuntime, ServiceState
from service.schemas import (
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
    error_examples,
    file_error,
    file_prediction,
    prediction,
)
from service.uploads import RouteLimits, Upload, UploadLimits

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
    """One file -> its result, or its own error *returned* (so one bad file never fails others).

    Every admitted image leaves here counted in exactly one outcome: classified, its own
    error, or abandoned (the request was cancelled: client gone, deadline, shutdown).
    """
    try:
        if upload.error is not None:
            raise upload.error
        image = await service.decode(upload.data, runtime.engine.input_size, allowance)
        result, info = await runtime.classify(reservation, image)
    except LungserveError as exc:
        service.observer.on_image_failed(exc)  # HOOK(metrics/logs): per-image error
        return exc
    except asyncio.CancelledError:
        service.observer.on_image_abandoned()
        raise
    service.observer.on_classified(result, info)  # HOOK(metrics/logs): batch id, queue wait, label
    return result


def _uploads(
    request: Request, service: ServiceState, limits: UploadLimits
) -> AbstractAsyncContextManager[list[Upload]]:
    headers = request.headers
    return admitted_uploads(
        service, headers.get("content-type"), headers.get("content-length"), request.stream(), limits
    )


def _allowance(service: ServiceState) -> PixelAllowance:
    return PixelAllowance(service.settings.max_request_pixels)


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
    # minLength: an empty file is never an image (422), so the schema says so.
    binary: dict[str, Any] = {"type": "string", "format": "binary", "minLength": 1}
    schema = {"type": "array", "items": binary} if many else binary
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [field], "properties": {field: schema}}
                }
            },
        }
    }


_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {
        "model": ErrorResponse,
        "description": "malformed multipart body or HTTP framing",
        "content": error_examples(("bad_request", "malformed multipart body: it ends before the closing boundary")),
    },
    408: {
        "model": ErrorResponse,
        "description": "the body arrived below the minimum upload rate",
        "content": error_examples(
            ("upload_too_slow", "the request body arrived at under 16384 bytes/s (LUNGSERVE_MIN_UPLOAD_RATE_BYTES_S)")
        ),
    },
    401: {
        "model": ErrorResponse,
        "description": "no valid API key (only when LUNGSERVE_API_KEYS_FILE is set)",
        "content": error_examples(("unauthorized", "the API key is not valid")),
    },
    413: {
        "model": ErrorResponse,
        "description": "file, image or request too large; too many files",
        "content": error_examples(
            ("image_too_large", "image is 12000x9000 = 108000000 pixels; the limit is 50000000"),
            ("too_many_files", "more than 64 file(s) in field 'files'"),
            ("request_too_large", "the request body is over 134217728 bytes"),
        ),
    },
    415: {
        "model": ErrorResponse,
        "description": "not a multipart/form-data body",
        "content": error_examples(
            ("unsupported_media_type", "expected a multipart/form-data body with field 'file', got application/json")
        ),
    },
    422: {
        "model": ErrorResponse,
        "description": "missing field, or not a decodable image",
        "content": error_examples(
            ("missing_field", "no file in multipart field 'file' (sent: 'image')"),
            ("invalid_image", "not a decodable image (expected JPEG, PNG, TIFF or BMP)"),
        ),
    },
    503: {
        "model": ErrorResponse,
        "description": "overloaded (with Retry-After), loading or shutting down",
        "content": error_examples(
            ("overloaded", "the server is at capacity (256 images admitted); retry shortly"),
            ("model_not_ready", "the model is still loading or warming up"),
            ("shutting_down", "the server is shutting down"),
        ),
    },
    504: {
        "model": ErrorResponse,
        "description": "no answer within the request deadline",
        "content": error_examples(("deadline_exceeded", "no answer within the request deadline of 30 s")),
    },
}


# --- routes ---------------------------------------------------------------------------------


@router.post(
    "/predict",
    summary="Classify one image",
    description="Multipart field `file`: a JPEG, PNG, TIFF or BMP image.",
    responses=_ERRORS,
    openapi_extra=_multipart_body("file", many=False),
)
async def predict(request: Request) -> PredictionResponse:
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
    return prediction(outcome)


@router.post(
    "/predict-many",
    summary="Classify several images",
    description=(
        "Repeated multipart field `files`. Answers in upload order; a file that cannot be "
        "classified gets its own `error` and does not fail the others."
    ),
    responses=_ERRORS,
    openapi_extra=_multipart_body("files", many=True),
)
async def predict_many(request: Request) -> PredictManyResponse:
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
    return PredictManyResponse(results=results)


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
            tissue_check=True,
        ),
    )
