"""POST /predict and /predict-many: parse, admit, classify, answer. No business logic here.

The bodies are multipart, parsed by `service.http.uploads` so that the queue is checked before
the body is read and every upload limit answers with its own JSON error.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.core.pipeline import classify_all
from service.core.state import ServiceState
from service.errors import LungserveError
from service.http.guards import guarded
from service.http.schemas import (
    ERROR_RESPONSES,
    FileError,
    FilePrediction,
    PredictionResponse,
    PredictManyResponse,
    file_error,
    file_prediction,
    multipart_body,
    prediction,
)
from service.http.uploads import MultipartBody, RouteLimits

router = APIRouter()


@router.post(
    "/predict",
    summary="Classify one image",
    description="Multipart field `file`: a JPEG, PNG, TIFF or BMP image.",
    response_model=PredictionResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=multipart_body("file", many=False),
)
async def predict(request: Request) -> Response:
    service: ServiceState = request.app.state.service
    limits: RouteLimits = request.app.state.upload_limits
    async with (
        guarded(service, request.receive) as watch,
        service.admit(MultipartBody.of(request, limits.predict)) as (upload,),
    ):
        (outcome,) = await watch(classify_all(service, [upload.image]))
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
    service: ServiceState = request.app.state.service
    limits: RouteLimits = request.app.state.upload_limits
    async with (
        guarded(service, request.receive) as watch,
        service.admit(MultipartBody.of(request, limits.predict_many)) as uploads,
    ):
        outcomes = await watch(classify_all(service, [u.image for u in uploads]))
    results: list[FilePrediction | FileError] = [
        file_error(upload.filename, outcome)
        if isinstance(outcome, LungserveError)
        else file_prediction(upload.filename, outcome)
        for upload, outcome in zip(uploads, outcomes, strict=True)
    ]
    return Response(PredictManyResponse(results=results).model_dump_json(), media_type="application/json")
