"""The Open Inference Protocol data plane, one for the REST and the gRPC transports (as KServe's).

Model lookup, metadata, and inference: the request's tensors are admitted, decoded, batched and
limited exactly like one /predict-many request (`service.core`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from service.core.admission import BodyReader
from service.core.model_client import Classified, ModelClient
from service.core.pipeline import classify_all
from service.core.state import ServiceState
from service.errors import LungserveError, NotFound
from service.oip.tensors import BYTES_INPUT, InferRequest, OutputTensor, check_outputs

# The refer decision (service.model.decision) travels as two more BYTES outputs ("reason" is ""
# when there is none).
OUTPUTS: Final = ("probabilities", "label", "decision", "reason")

Outcomes = list[Classified | LungserveError]


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


def model_named(service: ServiceState, name: str, version: str | None = None) -> ModelClient:
    """The model serving now, if it is the one asked for; else 404."""
    model = service.current()
    identity = model.identity
    if name != identity.name:
        raise NotFound(f"unknown model {name!r}; this server serves {identity.name!r}")
    if version is not None and version != identity.version:
        raise NotFound(f"model {name!r} has no version {version!r}; it serves {identity.version!r}")
    return model


def metadata_of(model: ModelClient) -> ModelMetadata:
    size = model.input_size
    return ModelMetadata(
        name=model.identity.name,
        versions=[model.identity.version],
        platform="onnxruntime_onnx",
        inputs=[
            TensorMetadata(name=BYTES_INPUT, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=model.manifest.input_name, datatype="UINT8", shape=[-1, size, size, 3]),
        ],
        outputs=[
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(model.manifest.classes)]),
            *(TensorMetadata(name=name, datatype="BYTES", shape=[-1]) for name in OUTPUTS[1:]),
        ],
    )


def outputs_of(results: Sequence[Classified]) -> list[OutputTensor]:
    n = len(results)
    probabilities = np.stack([r.probabilities for r in results]).astype(np.float32, copy=False)
    return [
        OutputTensor("probabilities", "FP32", list(probabilities.shape), probabilities),
        OutputTensor("label", "BYTES", [n], [r.label.encode() for r in results]),
        OutputTensor("decision", "BYTES", [n], [r.decision.decision.encode() for r in results]),
        OutputTensor("reason", "BYTES", [n], [(r.decision.reason or "").encode() for r in results]),
    ]


async def infer(
    service: ServiceState,
    body: BodyReader[InferRequest],
    watch: Callable[[Awaitable[Outcomes]], Awaitable[Outcomes]],
) -> tuple[InferRequest, list[Classified]]:
    """One inference: `body` is admitted and read like every door's, `watch` cancels the wait if
    the client leaves. The protocol has no per-row errors: the first bad row fails the request."""
    async with service.admit(body) as parsed:
        check_outputs(parsed, OUTPUTS)
        rows = parsed.encoded if parsed.encoded is not None else list(_pixels(parsed))
        outcomes = await watch(classify_all(service, rows))
    results: list[Classified] = []
    for row, outcome in enumerate(outcomes):
        if isinstance(outcome, LungserveError):
            outcome.message = f"input {parsed.input_name!r} row {row}: {outcome.message}"
            raise outcome
        results.append(outcome)
    return parsed, results


def _pixels(parsed: InferRequest) -> NDArray[np.uint8]:
    assert parsed.pixels is not None  # the codec gives exactly one of encoded and pixels
    return parsed.pixels
