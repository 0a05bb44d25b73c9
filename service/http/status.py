"""GET /health/live, /health/ready, /model and /metrics: what an operator and a probe ask."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.core.state import ServiceState
from service.http.schemas import (
    BatchingInfo,
    DecisionInfo,
    ErrorResponse,
    LiveResponse,
    ModelInfoResponse,
    ModelRef,
    ReadyResponse,
    UploadLimitsInfo,
)
from service.observability.metrics import Metrics

router = APIRouter()

_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "loading, warming up or shutting down"}
}


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


@router.get("/health/ready", summary="The model is loaded and warm", responses=_NOT_READY)
async def ready(request: Request) -> ReadyResponse:
    service: ServiceState = request.app.state.service
    model = service.ready()
    identity = model.identity
    return ReadyResponse(model=ModelRef(name=identity.name, version=identity.version), provider=model.provider)


@router.get("/model", summary="The model being served, its provider and the batching settings", responses=_NOT_READY)
async def model_info(request: Request) -> ModelInfoResponse:
    service: ServiceState = request.app.state.service
    model = service.current()
    s = service.settings
    return ModelInfoResponse(
        manifest=model.manifest.dump(),
        provider=model.provider,
        source=model.identity.as_dict(),
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
            refer_below=model.thresholds.refer_below,
            ood_above=model.thresholds.ood_above,
            ood_score=model.manifest.ood_output is not None,
            tissue_check=model.thresholds.tissue_check,
        ),
    )
