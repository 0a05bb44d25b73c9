"""OIP v2 tensors: requests built by the real tritonclient parse, and our responses parse in it."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from service.errors import LungserveError, TooManyFiles
from service.oip.tensors import (
    BYTES_INPUT,
    InferRequest,
    InvalidInferRequest,
    OutputTensor,
    check_outputs,
    deserialize_bytes,
    encode_infer_response,
    parse_infer_request,
    serialize_bytes,
)

SIZE = 4
IMAGES = [b"\xff\xd8\xff first image", b"", b"\x00\x01 third \xfe"]


def parse(body: bytes, header_length: int | None, max_images: int = 8) -> InferRequest:
    return parse_infer_request(
        body,
        None if header_length is None else str(header_length),
        pixels_input="image",
        size=SIZE,
        max_images=max_images,
    )


def triton_body(
    inputs: list[httpclient.InferInput], outputs: list[httpclient.InferRequestedOutput] | None = None
) -> tuple[bytes, int | None]:
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-7"
    )
    return bytes(body), header_length


def bytes_input(binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(BYTES_INPUT, [len(IMAGES)], "BYTES")
    # JSON cannot carry raw bytes: without binary data, each image travels as base64 text.
    values = IMAGES if binary else [base64.b64encode(i) for i in IMAGES]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input_from_tritonclient(binary: bool) -> None:
    body, header_length = triton_body([bytes_input(binary)])
    assert (header_length is not None) == binary
    request = parse(body, header_length)
    assert request.encoded == IMAGES
    assert request.pixels is None
    assert (request.id, request.input_name) == ("req-7", BYTES_INPUT)
    # No outputs named: tritonclient asks for every output in binary.
    assert request.outputs is None
    assert request.binary_default is True


def test_uint8_json_may_be_nested() -> None:
    pixels = np.arange(2 * SIZE * SIZE * 3, dtype=np.int64).reshape(2, SIZE, SIZE, 3) % 256
    body = json_request({"name": "image", "shape": [2, SIZE, SIZE, 3], "datatype": "UINT8", "data": pixels.tolist()})
    request = parse(body, None)
    assert request.pixels is not None
    np.testing.assert_array_equal(request.pixels, pixels)


@pytest.mark.parametrize("binary", [True, False])
def test_uint8_input_from_tritonclient(binary: bool) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    tensor = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    body, header_length = triton_body([tensor], [httpclient.InferRequestedOutput("label", binary_data=False)])
    request = parse(body, header_length)
    assert request.pixels is not None
    np.testing.assert_array_equal(request.pixels, pixels)
    assert request.outputs == {"label": False}


def test_bytes_round_trip() -> None:
    assert deserialize_bytes(serialize_bytes(IMAGES)) == IMAGES
    with pytest.raises(InvalidInferRequest, match="past the end"):
        deserialize_bytes(serialize_bytes([b"abcdef"])[:-1])


def json_request(tensor: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"not json", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (json.dumps({"inputs": []}).encode(), None, "exactly one input"),
        (json_request({"name": "other", "shape": [1], "datatype": "BYTES", "data": ["x"]}), None, "unknown input"),
        (json_request({"name": BYTES_INPUT, "shape": [1], "datatype": "FP32", "data": [1.0]}), None, "must be BYTES"),
        (
            json_request({"name": BYTES_INPUT, "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}),
            None,
            "not base64",
        ),
        (
            json_request({"name": BYTES_INPUT, "shape": [2], "datatype": "BYTES", "data": [b64(b"a")]}),
            None,
            "declares 2 elements but carries 1",
        ),
        (json_request({"name": BYTES_INPUT, "shape": [0], "datatype": "BYTES", "data": []}), None, "empty"),
        (
            json_request({"name": BYTES_INPUT, "shape": [1, 2], "datatype": "BYTES", "data": ["", ""]}),
            None,
            r"shape \[N\] or \[N, 1\]",
        ),
        (
            json_request({"name": BYTES_INPUT, "shape": "1", "datatype": "BYTES", "data": [""]}),
            None,
            "list of integers",
        ),
        (
            json_request({"name": "image", "shape": [1, 5, 5, 3], "datatype": "UINT8", "data": [0] * 75}),
            None,
            r"\[N, 4, 4, 3\]",
        ),
        (
            json_request({"name": "image", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": [300] * 48}),
            None,
            "0..255",
        ),
        (
            json_request({"name": "image", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": [1] * 47}),
            None,
            "47 values",
        ),
        (
            json_request({"name": "image", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": [1.5] * 48}),
            None,
            "0..255",
        ),
        (
            json_request({"name": "image", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": [[1, 2], [3]]}),
            None,
            "ragged",
        ),
        (
            json_request({"name": BYTES_INPUT, "shape": [1], "datatype": "BYTES", "data": [""]}) + b"extra",
            None,
            "not valid JSON",
        ),
        (b"{}", 99, "does not fit"),
        (b"{}", "x", "must be an integer"),
        (
            json_request(
                {"name": BYTES_INPUT, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}
            ),
            -1,
            "binary_data_size",
        ),
    ],
)
def test_bad_requests_are_400_with_a_reason(body: bytes, header_length: Any, message: str) -> None:
    if header_length == -1:
        header_length = len(body)
        body += serialize_bytes([b"abc"])  # 7 bytes, not the 9 declared
    with pytest.raises(InvalidInferRequest, match=message) as info:
        parse_infer_request(
            body,
            None if header_length is None else str(header_length),
            pixels_input="image",
            size=SIZE,
            max_images=8,
        )
    assert info.value.status == 400


def test_too_many_images_is_413() -> None:
    body, header_length = triton_body([bytes_input(binary=True)])
    with pytest.raises(TooManyFiles) as info:
        parse(body, header_length, max_images=2)
    assert isinstance(info.value, LungserveError)
    assert info.value.status == 413


def outputs() -> list[OutputTensor]:
    probabilities = np.array([[0.25, 0.5, 0.25], [0.9, 0.05, 0.05]], dtype=np.float32)
    return [
        OutputTensor("probabilities", "FP32", [2, 3], probabilities),
        OutputTensor("label", "BYTES", [2], [b"lung_n", b"lung_aca"]),
    ]


@pytest.mark.parametrize("binary", [True, False])
def test_response_parses_in_tritonclient(binary: bool) -> None:
    request = InferRequest("r1", BYTES_INPUT, encoded=[b"a", b"b"], outputs=None, binary_default=binary)
    body, header_length = encode_infer_response(request, "lung", "v1", outputs())
    assert (header_length is not None) == binary
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), outputs()[0].values)
    labels = result.as_numpy("label")
    # tritonclient returns binary BYTES as bytes and JSON BYTES as str.
    assert [v if isinstance(v, bytes) else v.encode() for v in labels.tolist()] == [b"lung_n", b"lung_aca"]
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("lung", "v1", "r1")


def test_only_requested_outputs_are_sent() -> None:
    request = InferRequest(None, BYTES_INPUT, encoded=[b"a"], outputs={"label": True})
    body, header_length = encode_infer_response(request, "lung", "v1", outputs())
    assert header_length is not None
    assert [o["name"] for o in json.loads(body[:header_length])["outputs"]] == ["label"]
    with pytest.raises(InvalidInferRequest, match="unknown output"):
        check_outputs(InferRequest(None, BYTES_INPUT, encoded=[b"a"], outputs={"logits": False}), ["label"])


@pytest.mark.parametrize("depth", [100_000, 3_000])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(depth: int) -> None:
    body = b'{"inputs":[],"parameters":' + b"[" * depth + b"]" * depth + b"}"
    # 3,000 levels exceed the parser's bound on CPython 3.11 and 3.12 but not on 3.13, which then
    # refuses the request for its content: a 400 either way, never a RecursionError.
    with pytest.raises(InvalidInferRequest) as info:
        parse_infer_request(body, None, pixels_input="image", size=SIZE, max_images=8)
    assert info.value.status == 400
    if depth == 100_000:
        assert "nested too deeply" in info.value.message
