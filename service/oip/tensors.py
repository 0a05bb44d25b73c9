"""Open Inference Protocol v2 (KServe / Triton) tensors: parse requests, encode responses.

Pure functions over bytes, no HTTP and no model: the REST and gRPC doors call them. Handles the
JSON body and the binary-data extension; lungserve takes one input per request, either
`BYTES_INPUT` (encoded image files) or the model's own UINT8 `[N, S, S, 3]` pixels. The wire
formats: docs/clients.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from service.errors import BadRequest, TooManyFiles

BYTES_INPUT: Final = "image_bytes"
HEADER_LENGTH: Final = "inference-header-content-length"

_NUMPY_TYPES: Final[dict[str, Any]] = {"FP32": np.float32, "UINT8": np.uint8}


class InvalidInferRequest(BadRequest):
    """The body is not a valid inference request for this model (the message says what)."""

    code = "invalid_inference_request"
    status = 400


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: exactly one of `encoded` (one image file per row) and `pixels`."""

    id: str | None
    input_name: str
    encoded: list[bytes] | None = None
    pixels: NDArray[np.uint8] | None = None
    # Requested outputs by name -> binary?; None: every output, binary if `binary_default`.
    outputs: dict[str, bool] | None = None
    binary_default: bool = False

    def wants_binary(self, name: str) -> bool:
        if self.outputs is None:
            return self.binary_default
        return self.outputs[name]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32" | "BYTES"
    shape: list[int]
    values: NDArray[Any] | list[bytes] = field(repr=False)


# --- BYTES tensors in binary ------------------------------------------------------------------


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """Triton's binary BYTES layout: each element as uint32 little-endian length + bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(buffer: bytes) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise InvalidInferRequest("binary BYTES tensor: truncated element length")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise InvalidInferRequest("binary BYTES tensor: an element runs past the end of its data")
        items.append(buffer[offset : offset + length])
        offset += length
    return items


# --- requests ---------------------------------------------------------------------------------


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    *,
    pixels_input: str,
    size: int,
    max_images: int,
) -> InferRequest:
    """Validate and decode one request body; every problem is an `InvalidInferRequest` (400)."""
    header, binary = _split(body, header_length)
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInferRequest(f"the inference header is not valid JSON: {exc}") from None
    except RecursionError:
        # The C parser bounds nesting by the interpreter's recursion limit (about 1,000 levels);
        # an OIP request needs fewer than 10.
        raise InvalidInferRequest("the inference header is nested too deeply") from None
    if not isinstance(request, dict):
        raise InvalidInferRequest("the inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInferRequest(
            f"expected exactly one input, {BYTES_INPUT!r} (BYTES, encoded images) or "
            f"{pixels_input!r} (UINT8 [N, {size}, {size}, 3])"
        )
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), _shape(tensor.get("shape"))
    raw = _binary_part(tensor, binary)
    if name == BYTES_INPUT:
        _expect(datatype, "BYTES", name)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInferRequest(f"input {name!r} must have shape [N] or [N, 1], got {shape}")
        encoded = deserialize_bytes(raw) if raw is not None else _base64_items(tensor.get("data"), name)
        _check_count(name, len(encoded), shape[0], max_images)
        return InferRequest(_id(request), name, encoded=encoded, **_outputs(request))
    if name == pixels_input:
        _expect(datatype, "UINT8", name)
        if len(shape) != 4 or shape[1:] != [size, size, 3]:
            raise InvalidInferRequest(f"input {name!r} must have shape [N, {size}, {size}, 3], got {shape}")
        pixels = _uint8(raw, tensor.get("data"), shape, name)
        _check_count(name, shape[0], shape[0], max_images)
        return InferRequest(_id(request), name, pixels=pixels, **_outputs(request))
    raise InvalidInferRequest(f"unknown input {name!r}: this model takes {BYTES_INPUT!r} or {pixels_input!r}")


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidInferRequest("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(body):
        raise InvalidInferRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def _shape(value: object) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInferRequest(f"an input's shape must be a list of integers, got {value!r}")
    if any(d < 0 for d in value):
        raise InvalidInferRequest(f"an input's shape must not be negative, got {value}")
    return list(value)


def _expect(datatype: object, expected: str, name: str) -> None:
    if datatype != expected:
        raise InvalidInferRequest(f"input {name!r} must be {expected}, got {datatype!r}")


def _binary_part(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        if binary:
            raise InvalidInferRequest("binary data follows the header, but no input declares binary_data_size")
        return None
    if not isinstance(size, int) or size < 0 or size != len(binary):
        raise InvalidInferRequest(
            f"binary_data_size {size!r} does not match the {len(binary)} bytes after the inference header"
        )
    if "data" in tensor:
        raise InvalidInferRequest("an input has both binary_data_size and data")
    return binary


def _flatten(data: object) -> Iterator[object]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _base64_items(data: object, name: str) -> list[bytes]:
    if not isinstance(data, list):
        raise InvalidInferRequest(f"input {name!r} has no data (JSON: a list of base64 strings)")
    items: list[bytes] = []
    for i, item in enumerate(_flatten(data)):
        if not isinstance(item, str):
            raise InvalidInferRequest(f"input {name!r} element {i}: expected a base64 string")
        try:
            items.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInferRequest(
                f"input {name!r} element {i} is not base64: in JSON, BYTES images must be base64 "
                "(or send them as binary data)"
            ) from None
    return items


def _uint8(raw: bytes | None, data: object, shape: list[int], name: str) -> NDArray[np.uint8]:
    expected = math.prod(shape)
    if raw is not None:
        if len(raw) != expected:
            raise InvalidInferRequest(f"input {name!r}: {len(raw)} bytes of data for shape {shape} ({expected})")
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    if not isinstance(data, list):
        raise InvalidInferRequest(f"input {name!r} has no data")
    # numpy, not a Python loop: a JSON UINT8 tensor can hold millions of values.
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInferRequest(f"input {name!r}: ragged nested lists") from None
    if values.size != expected:
        raise InvalidInferRequest(f"input {name!r}: {values.size} values for shape {shape} ({expected})")
    if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
        raise InvalidInferRequest(f"input {name!r}: UINT8 values must be integers in 0..255")
    return values.astype(np.uint8).reshape(shape)


def _check_count(name: str, found: int, declared: int, max_images: int) -> None:
    if found != declared:
        raise InvalidInferRequest(f"input {name!r} declares {declared} elements but carries {found}")
    if found == 0:
        raise InvalidInferRequest(f"input {name!r} is empty")
    if found > max_images:
        raise TooManyFiles(f"{found} images in one request; at most {max_images} (LUNGSERVE_MAX_FILES_PER_REQUEST)")


def _id(request: dict[str, Any]) -> str | None:
    value = request.get("id")
    return value if isinstance(value, str) else None


def _outputs(request: dict[str, Any]) -> dict[str, Any]:
    parameters = request.get("parameters") or {}
    binary_default = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    wanted = request.get("outputs")
    if wanted is None:
        return {"outputs": None, "binary_default": binary_default}
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
        raise InvalidInferRequest('"outputs" must be a list of {"name": ...} objects')
    chosen: dict[str, bool] = {}
    for output in wanted:
        params = output.get("parameters") or {}
        chosen[output["name"]] = bool(params.get("binary_data", binary_default)) if isinstance(params, dict) else False
    return {"outputs": chosen, "binary_default": binary_default}


# --- responses --------------------------------------------------------------------------------


def check_outputs(request: InferRequest, available: Sequence[str]) -> None:
    """Refuse (400) a request for an output this model does not have, before any work."""
    if request.outputs is None:
        return
    unknown = [name for name in request.outputs if name not in available]
    if unknown:
        raise InvalidInferRequest(f"unknown output(s) {unknown}; this model has {list(available)}")


def encode_infer_response(
    request: InferRequest, model_name: str, model_version: str, outputs: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header's length."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        header["id"] = request.id
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        if request.outputs is not None and out.name not in request.outputs:
            continue
        tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if request.wants_binary(out.name):
            blob = tensor_bytes(out)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _json_data(out)
        tensors.append(tensor)
    header["outputs"] = tensors
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def tensor_bytes(out: OutputTensor) -> bytes:
    """A tensor's binary form (BYTES: length-prefixed elements; numbers: raw little-endian)."""
    if out.datatype == "BYTES":
        assert isinstance(out.values, list)
        return serialize_bytes(out.values)
    array = np.ascontiguousarray(out.values, dtype=np.dtype(_NUMPY_TYPES[out.datatype]).newbyteorder("<"))
    return array.tobytes()


def _json_data(out: OutputTensor) -> list[Any]:
    if out.datatype == "BYTES":
        assert isinstance(out.values, list)
        # Outputs are our own UTF-8 strings (labels, decisions): JSON carries them as text.
        return [v.decode() for v in out.values]
    return [float(v) for v in np.asarray(out.values, dtype=_NUMPY_TYPES[out.datatype]).ravel()]
