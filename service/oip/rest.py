"""Open Inference Protocol v2 over HTTP (KServe / Triton): a door onto the same core as /predict.

Routes under `/v2` (health, server and model metadata, readiness, infer); tensors are parsed and
encoded by `service.oip.tensors`, and every image is admitted, decoded, batched and answered as
one of /predict-many. Errors keep the protocol's shape, `{"error": "message"}`, rendered by the
app's one error mapping (`service.http.errors.http_error`) for paths under `/v2`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

import service
from service.core.model_client import ModelClient
from service.core.state import ServiceState
from service.errors import BadRequest, RequestTooLarge, UnsupportedMediaType
from service.http.errors import OIP_PREFIX
from service.http.guards import guarded, unless_disconnected
from service.http.uploads import RouteLimits, UploadLimits, declared_length, paced
from service.oip import dataplane
from service.oip.dataplane import ModelMetadata, Outcomes, metadata_of, model_named, outputs_of
from service.oip.tensors import BYTES_INPUT, HEADER_LENGTH, InferRequest, encode_infer_response, parse_infer_request
from service.settings import Settings

PREFIX: Final = OIP_PREFIX
BINARY_HEADER: Final = "Inference-Header-Content-Length"

router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol v2"])


# --- response models (for /docs; the infer answer is built by the codec) ------------------------


class OipError(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "unknown model 'resnet'"}]})
    error: str = Field(description="what went wrong (the protocol's error shape)")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "not a valid inference request for this model (the message says what)",
        404: "no such model or version",
        413: "body over LUNGSERVE_MAX_REQUEST_BYTES, or more images than LUNGSERVE_MAX_FILES_PER_REQUEST",
        415: "compressed request bodies are not supported",
        422: "an image is not decodable, or too large",
        503: "overloaded (with Retry-After), loading, or shutting down",
        504: "no answer within the request deadline",
    }
    return {s: {"model": OipError, "description": meaning[s]} for s in statuses}


# --- helpers ----------------------------------------------------------------------------------


def _service(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


async def _read_body(stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise RequestTooLarge(f"the request body is over {max_bytes} bytes (LUNGSERVE_MAX_REQUEST_BYTES)")
            chunks.append(chunk)
    except ClientDisconnect as exc:  # as service.http.uploads answers it (nobody reads the answer)
        raise BadRequest("the client disconnected before the request body was complete") from exc
    return b"".join(chunks)


@dataclass(frozen=True)
class _InferBody:
    """An infer request's body as `service.core.admission` admits it (a `BodyReader`)."""

    request: Request
    model: ModelClient
    settings: Settings
    rate: UploadLimits

    def check(self) -> None:
        if self.request.headers.get("content-encoding", "identity").lower() != "identity":
            raise UnsupportedMediaType("compressed request bodies are not supported; send them uncompressed")
        declared = self.declared
        if declared is not None and declared > self.settings.max_request_bytes:
            raise RequestTooLarge(f"the request body is over {self.settings.max_request_bytes} bytes")

    @property
    def declared(self) -> int | None:
        return declared_length(self.request.headers.get("content-length"))

    @property
    def charge(self) -> int:
        declared = self.declared
        return declared if declared is not None else self.settings.max_request_bytes

    async def read(self) -> InferRequest:
        body = await _read_body(paced(self.request.stream(), self.rate), self.settings.max_request_bytes)
        # Off the event loop: a body may be up to LUNGSERVE_MAX_REQUEST_BYTES of JSON.
        return await asyncio.to_thread(
            parse_infer_request,
            body,
            self.request.headers.get(HEADER_LENGTH),
            pixels_input=self.model.manifest.input_name,
            size=self.model.input_size,
            max_images=self.settings.max_files_per_request,
        )


# --- routes -----------------------------------------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="lungserve", version=service.__version__, extensions=["binary_tensor_data"])


@router.get("/health/live", summary="The process is up")
async def server_live() -> Liveness:
    return Liveness(live=True)


@router.get("/health/ready", summary="The model is loaded and warm", responses=_errors(503))
async def server_ready(request: Request) -> Readiness:
    _service(request).current()
    return Readiness(ready=True)


@router.get("/models/{name}", summary="Model metadata", responses=_errors(404, 503))
async def model_metadata(request: Request, name: str) -> ModelMetadata:
    return metadata_of(model_named(_service(request), name))


@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)", responses=_errors(404, 503))
async def model_version_metadata(request: Request, name: str, version: str) -> ModelMetadata:
    return metadata_of(model_named(_service(request), name, version))


@router.get("/models/{name}/ready", summary="The model is ready", responses=_errors(404, 503))
async def model_ready(request: Request, name: str) -> ModelReadiness:
    model_named(_service(request), name)
    return ModelReadiness(name=name, ready=True)


@router.get(
    "/models/{name}/versions/{version}/ready", summary="The model version is ready", responses=_errors(404, 503)
)
async def model_version_ready(request: Request, name: str, version: str) -> ModelReadiness:
    model_named(_service(request), name, version)
    return ModelReadiness(name=name, ready=True)


_INFER_DOC: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "example": {
                    "id": "slide-17",
                    "inputs": [{"name": BYTES_INPUT, "shape": [1], "datatype": "BYTES", "data": ["<base64 JPEG>"]}],
                    "outputs": [{"name": "probabilities"}, {"name": "label"}],
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary-data extension: JSON header (length in Inference-Header-Content-Length), "
                "then the tensors' raw bytes",
            },
        },
    }
}
_INFER_DESCRIPTION: Final = (
    f"One input per request: `{BYTES_INPUT}` BYTES `[N]`, encoded images (JPEG, PNG, TIFF, BMP; base64 "
    "strings in JSON, raw bytes with the binary-data extension), or the model's input UINT8 `[N, S, S, 3]` "
    "(RGB, already resized). Outputs: `probabilities` FP32 `[N, C]` (class order of the model's metadata "
    "and `/model`) and `label` BYTES `[N]`; with the refer decision, `decision` BYTES `[N]` (accept | refer) "
    "and `reason` BYTES `[N]` (low_confidence | out_of_distribution, empty when accepted). The images are "
    "admitted, batched and limited exactly like `/predict-many` (LUNGSERVE_MAX_FILES_PER_REQUEST, "
    "LUNGSERVE_QUEUE_LIMIT, LUNGSERVE_REQUEST_DEADLINE_S)."
)


_INFER_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"description": "the outputs (JSON, or JSON header + binary tensors)"},
    **_errors(400, 404, 413, 415, 422, 503, 504),
}


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    description=_INFER_DESCRIPTION,
    response_class=Response,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference (one version)",
    description=_INFER_DESCRIPTION,
    response_class=Response,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    service = _service(request)
    limits: RouteLimits = request.app.state.upload_limits

    def watch(work: Awaitable[Outcomes]) -> Awaitable[Outcomes]:
        return unless_disconnected(work, request.receive)

    async with guarded(service):
        body = _InferBody(request, model_named(service, name, version), service.settings, limits.predict_many)
        parsed, results = await dataplane.infer(service, body, watch)
    manifest = results[0].manifest
    body_bytes, header_length = encode_infer_response(parsed, manifest.name, manifest.version, outputs_of(results))
    if header_length is None:
        return Response(body_bytes, media_type="application/json")
    return Response(body_bytes, media_type="application/octet-stream", headers={BINARY_HEADER: str(header_length)})
