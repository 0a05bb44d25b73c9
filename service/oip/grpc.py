"""Open Inference Protocol v2 over gRPC (KServe / Triton `inference.GRPCInferenceService`).

A second transport onto the same data plane as REST (`service.oip.dataplane.infer`): the same
admission, decode, batching, deadline, metrics and decision; errors map to gRPC codes in
`service.http.errors.grpc_status`; API keys guard all but health and readiness. On when
`LUNGSERVE_GRPC_PORT` is set; needs the `grpc` extra (docs/clients.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from typing import Any, Final

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

import service
from service.core.model_client import ModelClient
from service.core.state import Phase, ServiceState
from service.errors import LungserveError, Unauthorized
from service.http.access import KeyRing
from service.http.errors import grpc_status, http_error
from service.http.guards import guarded
from service.observability.logs import RequestContext, new_request_id, use_request
from service.observability.metrics import Metrics
from service.oip import dataplane
from service.oip.dataplane import Outcomes, metadata_of, model_named, outputs_of
from service.oip.tensors import InferRequest, InvalidInferRequest, parse_infer_request, serialize_bytes, tensor_bytes

SERVICE: Final = "/inference.GRPCInferenceService"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, state: ServiceState, metrics: Metrics, keys: KeyRing | None) -> None:
        self.state = state
        self.metrics = metrics
        self.keys = keys

    # --- health: open, like /v2/health/* ---

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.state.phase is Phase.READY and self.state.runtime is not None)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            model_named(self.state, request.name, request.version or None)
        except LungserveError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    # --- metadata and inference: behind the API keys, when there are any ---

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._call(
            "ServerMetadata",
            context,
            _server_metadata(),
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._call("ModelMetadata", context, self._model_metadata(request))

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._call("ModelInfer", context, self._infer(request))

    async def _model_metadata(self, request: Any) -> Any:
        meta = metadata_of(model_named(self.state, request.name, request.version or None))
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t.model_dump()) for t in meta.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t.model_dump()) for t in meta.outputs],
        )

    async def _infer(self, request: Any) -> Any:
        def watch(work: Awaitable[Outcomes]) -> Awaitable[Outcomes]:
            return work  # a client that leaves cancels this handler, and with it the queued images

        async with guarded(self.state):
            model = model_named(self.state, request.model_name, request.model_version or None)
            body = _GrpcBody(request, model, self.state.settings.max_files_per_request)
            parsed, results = await dataplane.infer(self.state, body, watch)
        manifest = results[0].manifest
        response = pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version)
        if parsed.id is not None:
            response.id = parsed.id
        for out in outputs_of(results):
            if parsed.outputs is not None and out.name not in parsed.outputs:
                continue
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(tensor_bytes(out))
        return response

    async def _call(self, method: str, context: Any, work: Awaitable[Any]) -> Any:
        """Key check, request context (timing, images) and request metrics around one call;
        domain errors become gRPC statuses (the one mapping is in service.errors)."""
        started = time.perf_counter()
        status = 200
        ctx = RequestContext(new_request_id())
        try:
            with use_request(ctx):
                self._authorize(context)
                return await work
        except LungserveError as exc:
            status = exc.status
            # Retry-After (overload) travels as trailing metadata: gRPC has no headers of its own.
            trailers = tuple((k.lower(), v) for k, v in http_error(exc).headers.items())
            await context.abort(getattr(grpc.StatusCode, grpc_status(exc)), exc.message, trailers)
            raise AssertionError("context.abort raises") from exc
        finally:
            if hasattr(work, "close"):
                work.close()  # never awaited when the key check refused the call
            self.metrics.observe_request(f"{SERVICE}/{method}", status, time.perf_counter() - started)

    def _authorize(self, context: Any) -> None:
        if self.keys is None:
            return
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        key = metadata.get("x-api-key")
        if not key:
            scheme, _, credentials = str(metadata.get("authorization", "")).partition(" ")
            key = credentials.strip() if scheme.lower() == "bearer" else ""
        if not key:
            self.metrics.api_key_request(None, "missing")
            raise Unauthorized("this server needs an API key: 'authorization: Bearer KEY' or 'x-api-key' metadata")
        name = self.keys.identify(str(key))
        self.metrics.api_key_request(name, "ok" if name else "invalid")
        if name is None:
            raise Unauthorized("the API key is not valid")


async def _server_metadata() -> Any:
    return pb.ServerMetadataResponse(name="lungserve", version=service.__version__, extensions=["binary_tensor_data"])


def _as_rest_body(request: Any) -> tuple[bytes, str]:
    """The gRPC request as the REST binary-data form, so one codec validates both transports."""
    if len(request.inputs) != 1:
        raise InvalidInferRequest("expected exactly one input")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInferRequest("raw_input_contents must hold exactly the one input")
        raw = bytes(request.raw_input_contents[0])
    elif tensor.contents.bytes_contents:
        raw = serialize_bytes([bytes(b) for b in tensor.contents.bytes_contents])
    elif tensor.contents.uint_contents:
        values = list(tensor.contents.uint_contents)
        if any(v > 255 for v in values):
            raise InvalidInferRequest(f"input {tensor.name!r}: UINT8 values must be integers in 0..255")
        raw = bytes(values)
    else:
        raise InvalidInferRequest(f"input {tensor.name!r} has no data")
    wanted = [{"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs]
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    if request.id:
        header["id"] = request.id
    if wanted:
        header["outputs"] = wanted
    head = json.dumps(header).encode()
    return head + raw, str(len(head))


class GrpcDoor:
    """The gRPC server's life: started once the model is ready, stopped (with grace) before the drain."""

    def __init__(self, state: ServiceState, metrics: Metrics, keys: KeyRing | None) -> None:
        self.state = state
        self.metrics = metrics
        self.keys = keys
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        max_message = self.state.settings.max_request_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                # Every front of `lungserve serve` binds this port; the kernel spreads the
                # connections (docs/topology.md). gRPC's default on Linux, stated, not assumed.
                ("grpc.so_reuseport", 1),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.state, self.metrics, self.keys), self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        await self.server.start()
        return self.port

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None


class _GrpcBody:
    """A gRPC infer request as `service.core.admission` admits it: already received by grpcio,
    so it is charged its size against the body budget and parsed by the REST codec."""

    def __init__(self, request: Any, model: ModelClient, max_images: int) -> None:
        self._request = request
        self._model = model
        self._max_images = max_images
        self._body, self._header_length = _as_rest_body(request)

    def check(self) -> None:
        pass

    @property
    def charge(self) -> int:
        return len(self._body)

    async def read(self) -> InferRequest:
        return parse_infer_request(
            self._body,
            self._header_length,
            pixels_input=self._model.manifest.input_name,
            size=self._model.input_size,
            max_images=self._max_images,
        )
