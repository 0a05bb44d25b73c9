"""Open Inference Protocol v2 over HTTP (KServe / Triton): a door onto the same core as /predict.

Routes: `/v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}` (and
`/versions/{version}`), `/v2/models/{name}/ready` and `/v2/models/{name}/infer`. Tensors are
parsed and encoded by `service.oip.tensors`; every image is admitted, decoded, batched and
answered exactly as one of /predict-many (same queue limit, deadline, metrics and model
version). Errors keep the protocol's shape, `{"error": "message"}`; the app's one error
mapping (`service.errors.http_error`) renders them so for paths under `/v2`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

import service
from service.core.admission import BodyTicket
from service.core.decode_pool import PixelAllowance
from service.core.runtime import Classified, Image, ImageReservation, ModelRuntime, ServiceState
from service.errors import (
    BadRequest,
    LungserveError,
    ModelNotReady,
    NotFound,
    RequestTooLarge,
    UnsupportedMediaType,
)
from service.http.guards import deadline, unless_disconnected
from service.http.uploads import RouteLimits, declared_length, paced
from service.oip.tensors import (
    BYTES_INPUT,
    HEADER_LENGTH,
    InferRequest,
    OutputTensor,
    check_outputs,
    encode_infer_response,
    parse_infer_request,
)

PREFIX: Final = "/v2"
BINARY_HEADER: Final = "Inference-Header-Content-Length"
# The refer decision (service.model.decision): every prediction carries it, so OIP answers do too, as
# two more BYTES outputs ("reason" is "" when there is none).
OUTPUTS: Final = ("probabilities", "label", "decision", "reason")

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


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "lungserve-lung-cnn",
                    "versions": ["2026.11.22-6d5d6424"],
                    "platform": "onnxruntime_onnx",
                    "inputs": [
                        {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
                        {"name": "image", "datatype": "UINT8", "shape": [-1, 128, 128, 3]},
                    ],
                    "outputs": [
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    ],
                }
            ]
        }
    )
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="send ONE of these per request")
    outputs: list[TensorMetadata]


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


def model_runtime(service: ServiceState, name: str, version: str | None = None) -> ModelRuntime:
    runtime = service.current()
    model = runtime.identity
    if name != model.name:
        raise NotFound(f"unknown model {name!r}; this server serves {model.name!r}")
    if version is not None and version != model.version:
        raise NotFound(f"model {name!r} has no version {version!r}; it serves {model.version!r}")
    return runtime


def metadata_of(runtime: ModelRuntime) -> ModelMetadata:
    engine = runtime.engine
    size = engine.input_size
    return ModelMetadata(
        name=runtime.identity.name,
        versions=[runtime.identity.version],
        platform="onnxruntime_onnx",
        inputs=[
            TensorMetadata(name=BYTES_INPUT, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=engine.manifest.input_name, datatype="UINT8", shape=[-1, size, size, 3]),
        ],
        outputs=[
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(engine.manifest.classes)]),
            *(TensorMetadata(name=name, datatype="BYTES", shape=[-1]) for name in OUTPUTS[1:]),
        ],
    )


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


async def _classify(
    service: ServiceState,
    runtime: ModelRuntime,
    reservation: ImageReservation,
    image: bytes | Image,
    allowance: PixelAllowance,
) -> Classified | LungserveError:
    """One row: decoded (unless already pixels), then batched like any /predict image (the one
    per-image path, `ServiceState.classify_image`, which counts every admitted image once)."""
    return await service.classify_image(runtime, reservation, image, allowance)


def _rows(pixels: Image | None) -> list[Image]:
    assert pixels is not None  # the codec gives exactly one of encoded and pixels
    return list(pixels)


def outputs_of(results: Sequence[Classified]) -> list[OutputTensor]:
    n = len(results)
    probabilities = np.stack([r.probabilities for r in results]).astype(np.float32, copy=False)
    return [
        OutputTensor("probabilities", "FP32", list(probabilities.shape), probabilities),
        OutputTensor("label", "BYTES", [n], [r.label.encode() for r in results]),
        OutputTensor("decision", "BYTES", [n], [r.decision.decision.encode() for r in results]),
        OutputTensor("reason", "BYTES", [n], [(r.decision.reason or "").encode() for r in results]),
    ]


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
    return metadata_of(model_runtime(_service(request), name))


@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)", responses=_errors(404, 503))
async def model_version_metadata(request: Request, name: str, version: str) -> ModelMetadata:
    return metadata_of(model_runtime(_service(request), name, version))


@router.get("/models/{name}/ready", summary="The model is ready", responses=_errors(404, 503))
async def model_ready(request: Request, name: str) -> ModelReadiness:
    model_runtime(_service(request), name)
    return ModelReadiness(name=name, ready=True)


@router.get(
    "/models/{name}/versions/{version}/ready", summary="The model version is ready", responses=_errors(404, 503)
)
async def model_version_ready(request: Request, name: str, version: str) -> ModelReadiness:
    model_runtime(_service(request), name, version)
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
    settings = service.settings
    limits: RouteLimits = request.app.state.upload_limits
    ticket: BodyTicket | None = None

    async def read(runtime: ModelRuntime) -> InferRequest:
        # The upload routes' admission (service.core.admission), in the same order: what costs nothing,
        # a full queue (503 before the body), the upload gate, then the body at the minimum rate.
        nonlocal ticket
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise UnsupportedMediaType("compressed request bodies are not supported; send them uncompressed")
        declared = declared_length(request.headers.get("content-length"))
        if declared is not None and declared > settings.max_request_bytes:
            raise RequestTooLarge(f"the request body is over {settings.max_request_bytes} bytes")
        if runtime.batcher.available == 0:
            runtime.reserve(1).release()  # raises the usual 503 overloaded, with Retry-After
        if service.upload_gate is None:
            raise ModelNotReady("the server is not started")
        ticket = service.upload_gate.admit(declared if declared is not None else settings.max_request_bytes)
        body = await _read_body(paced(request.stream(), limits.predict_many), settings.max_request_bytes)
        ticket.body_read()
        # Off the event loop: a body may be up to LUNGSERVE_MAX_REQUEST_BYTES of JSON.
        return await asyncio.to_thread(
            parse_infer_request,
            body,
            request.headers.get(HEADER_LENGTH),
            pixels_input=runtime.engine.manifest.input_name,
            size=runtime.engine.input_size,
            max_images=settings.max_files_per_request,
        )

    def watch(work: Awaitable[Outcomes]) -> Awaitable[Outcomes]:
        return unless_disconnected(work, request.receive)

    try:
        parsed, results = await run_inference(service, name, version, read, watch)
    finally:
        if ticket is not None:
            ticket.close()  # the body's bytes are free once its images are decoded and answered
    manifest = results[0].manifest
    body, header_length = encode_infer_response(parsed, manifest.name, manifest.version, outputs_of(results))
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={BINARY_HEADER: str(header_length)})


Outcomes = list[Classified | LungserveError]


async def run_inference(
    service: ServiceState,
    name: str,
    version: str | None,
    read: Callable[[ModelRuntime], Awaitable[InferRequest]],
    watch: Callable[[Awaitable[Outcomes]], Awaitable[Outcomes]],
) -> tuple[InferRequest, list[Classified]]:
    """One OIP inference, for the REST and the gRPC door alike: `read` gets the request's tensors
    (within the deadline, before admission: a slow body never holds a slot), `watch` cancels the
    wait if the client leaves. Admission, decode, batching and metrics are /predict-many's."""
    try:
        runtime = model_runtime(service, name, version)
        async with deadline(service.settings.request_deadline_s):
            parsed = await read(runtime)
            check_outputs(parsed, OUTPUTS)
            # As /predict-many: admit into the runtime serving now (a reload may have swapped it).
            runtime = model_runtime(service, name, version)
            rows: Sequence[bytes | Image] = parsed.encoded if parsed.encoded is not None else _rows(parsed.pixels)
            # One decode budget per request, as /predict-many (LUNGSERVE_MAX_REQUEST_PIXELS).
            allowance = PixelAllowance(service.settings.max_request_pixels)
            with runtime.reserve(len(rows)) as reservation:
                outcomes = await watch(
                    asyncio.gather(*(_classify(service, runtime, reservation, r, allowance) for r in rows))
                )
    except LungserveError as exc:
        service.observer.on_rejected(exc)
        raise
    results: list[Classified] = []
    for row, outcome in enumerate(outcomes):
        if isinstance(outcome, LungserveError):
            # The protocol has no per-row errors: the first bad row fails the request, named.
            outcome.message = f"input {parsed.input_name!r} row {row}: {outcome.message}"
            raise outcome
        results.append(outcome)
    return parsed, results
