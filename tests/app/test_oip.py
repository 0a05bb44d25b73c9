"""OIP v2 in-process: the same core as /predict (answers, limits, overload, metrics), errors in
the protocol's shape. Requests are built by tritonclient's own encoder."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from service.model.manifest import Manifest
from service.model.preprocess import load_image
from service.oip.dataplane import OUTPUTS
from tests.app.conftest import Served, make_settings, post_stalled_upload, serve
from tests.conftest import BUNDLED_MODEL
from tests.images import noise_jpeg

pytestmark = pytest.mark.anyio

MANIFEST = Manifest.read(BUNDLED_MODEL / "model.json")
INFER = f"/v2/models/{MANIFEST.name}/infer"


def body_of(images: list[bytes], binary: bool) -> tuple[bytes, dict[str, str]]:
    tensor = httpclient.InferInput("image_bytes", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(i) for i in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    )
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return bytes(body), headers


async def infer(client: httpx.AsyncClient, images: list[bytes], binary: bool) -> Any:
    body, headers = body_of(images, binary)
    response = await client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    return httpclient.InferenceServerClient.parse_response_body(
        response.content, header_length=None if length is None else int(length)
    )


def oip_error(response: httpx.Response, status: int, contains: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert contains in body["error"], body["error"]
    return str(body["error"])


@pytest.mark.parametrize("binary", [True, False])
async def test_infer_equals_predict(served: Served, real_images: list[Path], binary: bool) -> None:
    datas = [p.read_bytes() for p in real_images]
    result = await infer(served.client, datas, binary)
    probabilities = result.as_numpy("probabilities")
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    assert probabilities.shape == (len(datas), len(MANIFEST.classes))
    for data, row, label in zip(datas, probabilities, labels, strict=True):
        single = (await served.client.post("/predict", files={"file": ("t.jpeg", data)})).json()
        np.testing.assert_allclose(row, [single["probabilities"][c] for c in MANIFEST.classes], rtol=0, atol=1e-5)
        assert label == single["label"]
    # The refer decision travels as two BYTES outputs, equal to /predict's.
    decided = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("decision").tolist()]
    reasons = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("reason").tolist()]
    for data, decision, reason in zip(datas, decided, reasons, strict=True):
        single = (await served.client.post("/predict", files={"file": ("t.jpeg", data)})).json()
        assert (decision, reason or None) == (single["decision"], single["reason"])
    assert result.get_response()["model_version"] == MANIFEST.version


async def test_uint8_pixels_equal_encoded_images(served: Served, real_images: list[Path]) -> None:
    datas = [p.read_bytes() for p in real_images]
    pixels = np.stack([load_image(d, MANIFEST.input_size) for d in datas])
    tensor = httpclient.InferInput(MANIFEST.input_name, list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    body, length = httpclient.InferenceServerClient.generate_request_body([tensor])
    response = await served.client.post(
        INFER, content=bytes(body), headers={"Inference-Header-Content-Length": str(length)}
    )
    assert response.status_code == 200, response.text
    result = httpclient.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers["inference-header-content-length"])
    )
    encoded = await infer(served.client, datas, binary=True)
    np.testing.assert_allclose(result.as_numpy("probabilities"), encoded.as_numpy("probabilities"), rtol=0, atol=1e-5)


async def test_metadata_health_and_readiness(served: Served) -> None:
    client = served.client
    assert (await client.get("/v2")).json()["extensions"] == ["binary_tensor_data"]
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    meta = (await client.get(f"/v2/models/{MANIFEST.name}")).json()
    assert meta["versions"] == [MANIFEST.version]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image_bytes": "BYTES", "image": "UINT8"}
    decisions = {"decision": [-1], "reason": [-1]}
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "probabilities": [-1, len(MANIFEST.classes)],
        "label": [-1],
        **decisions,
    }
    versioned = f"/v2/models/{MANIFEST.name}/versions/{MANIFEST.version}"
    assert (await client.get(versioned)).json() == meta
    assert (await client.get(f"{versioned}/ready")).json() == {"name": MANIFEST.name, "ready": True}
    oip_error(await client.get("/v2/models/resnet50"), 404, "unknown model 'resnet50'")
    oip_error(await client.get(f"/v2/models/{MANIFEST.name}/versions/0/ready"), 404, "no version '0'")


async def test_errors_take_the_protocol_shape(served: Served) -> None:
    client = served.client
    oip_error(await client.post(INFER, content=b"{nope"), 400, "not valid JSON")
    oip_error(await client.post("/v2/models/resnet50/infer", content=b"{}"), 404, "unknown model")
    body, headers = body_of([noise_jpeg(), b"this is not an image"], binary=True)
    oip_error(await client.post(INFER, content=body, headers=headers), 422, "'image_bytes' row 1:")
    body, headers = body_of([noise_jpeg()] * 9, binary=True)  # max_files_per_request is 8
    oip_error(await client.post(INFER, content=body, headers=headers), 413, "at most 8")
    oip_error(await client.post(INFER, content=b"{}", headers={"Content-Encoding": "gzip"}), 415, "compressed request")
    wrong_output = b'{"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [""]}],'
    wrong_output += b' "outputs": [{"name": "logits"}]}'
    oip_error(await client.post(INFER, content=wrong_output), 400, "unknown output")
    big = b"x" * (served.state.settings.max_request_bytes + 1)
    oip_error(await client.post(INFER, content=big), 413, "over")  # declared Content-Length

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(4):
            yield big[: len(big) // 3]

    oip_error(await client.post(INFER, content=streamed()), 413, "LUNGSERVE_MAX_REQUEST_BYTES")
    # Elsewhere, errors keep lungserve's shape.
    assert (await client.get("/nowhere")).json()["error"]["code"] == "not_found"


async def test_overload_is_the_same_queue_as_predict(served: Served) -> None:
    model = served.state.current()
    # One slot held the way an admitted /predict holds it (slots are taken once a body is read).
    held = model.reserve(1)
    try:
        assert model.free_slots == served.state.settings.queue_limit - 1
        body, headers = body_of([noise_jpeg()] * 8, binary=True)  # queue_limit is 8; one slot is held
        response = await served.client.post(INFER, content=body, headers=headers)
        oip_error(response, 503, "at capacity")
        assert response.headers["retry-after"] == "1"
    finally:
        held.release()
    metrics = (await served.client.get("/metrics")).text
    assert 'lungserve_rejected_total{reason="queue_full"} 1.0' in metrics
    assert 'route="/v2/models/{name}/infer",status="5xx"' in metrics


async def test_infer_counts_images_like_predict(served: Served) -> None:
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 180)).save(png, format="PNG")
    await infer(served.client, [noise_jpeg(), png.getvalue()], binary=False)
    metrics = (await served.client.get("/metrics")).text
    assert 'lungserve_images_total{outcome="ok"} 2.0' in metrics


async def test_infer_bodies_pass_the_upload_gate_and_pixel_budget() -> None:
    settings = make_settings(
        max_uploads_in_flight=1, min_upload_rate_bytes_s=0, max_image_pixels=224 * 224, max_request_pixels=2 * 224 * 224
    )
    async with serve(settings) as s:
        gate = s.state.upload_gate
        assert gate is not None
        never = asyncio.Event()
        stalled = asyncio.ensure_future(post_stalled_upload(s.client, never))
        try:
            for _ in range(500):  # until the stalled upload holds the one upload slot (observed, not a delay)
                if gate.uploads == 1:
                    break
                await asyncio.sleep(0.01)
            assert gate.uploads == 1
            body, headers = body_of([noise_jpeg()], binary=True)
            oip_error(await s.client.post(INFER, content=body, headers=headers), 503, "LUNGSERVE_MAX_UPLOADS_IN_FLIGHT")
        finally:
            never.set()
            await stalled
        assert (gate.uploads, gate.body_bytes) == (0, 0)

        # Three 224 px images decode to more pixels than the request's budget of two.
        body, headers = body_of([noise_jpeg()] * 3, binary=True)
        oip_error(await s.client.post(INFER, content=body, headers=headers), 413, "LUNGSERVE_MAX_REQUEST_PIXELS")
        result = await infer(s.client, [noise_jpeg()] * 2, binary=True)
        assert result.as_numpy("probabilities").shape == (2, len(MANIFEST.classes))
        assert (gate.uploads, gate.body_bytes) == (0, 0)
