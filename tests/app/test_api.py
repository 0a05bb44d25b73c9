"""The HTTP API in-process: real engine on the bundled model, real images, every bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from service.app import create_app
from service.core.engine import ProviderUnavailable
from service.errors import ModelSourceError
from service.model.manifest import Manifest
from service.model.preprocess import load_image
from tests.app.conftest import LIFESPAN_TIMEOUT_S, Served, make_settings, post_stalled_upload, serve
from tests.conftest import BUNDLED_MODEL
from tests.images import encode, noise_jpeg

pytestmark = pytest.mark.anyio

MANIFEST = Manifest.read(BUNDLED_MODEL / "model.json")


def direct(data: bytes) -> np.ndarray:
    """Reference answer: ORT on the bundled model, one image, no service code but load_image."""
    session = ort.InferenceSession(str(BUNDLED_MODEL / MANIFEST.file), providers=["CPUExecutionProvider"])
    batch = load_image(data, MANIFEST.input_size)[None]
    (out,) = session.run([MANIFEST.output_name], {MANIFEST.input_name: batch})
    return np.asarray(out[0])


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def truncated_jpeg() -> bytes:
    data = noise_jpeg(seed=3)
    return data[: len(data) // 2]


# --- the happy path ----------------------------------------------------------------------


async def test_predict_equals_direct_inference(served: Served, real_images: list[Path]) -> None:
    for path in real_images:
        data = path.read_bytes()
        r = await served.client.post("/predict", files={"file": (path.name, data, "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"label", "confidence", "probabilities", "decision", "reason", "model"}
        # The bundled model has no decision section: a real tile passes the tissue check and is accepted.
        assert (body["decision"], body["reason"]) == ("accept", None)
        assert list(body["probabilities"]) == MANIFEST.classes
        expected = direct(data)
        np.testing.assert_allclose([body["probabilities"][c] for c in MANIFEST.classes], expected, atol=1e-6)
        assert body["label"] == MANIFEST.classes[int(np.argmax(expected))]
        assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
        assert body["model"] == {"name": MANIFEST.name, "version": MANIFEST.version}


async def test_concurrent_requests_are_batched_without_changing_answers(
    served: Served, real_images: list[Path]
) -> None:
    datas = [p.read_bytes() for p in real_images] * 2  # 6 images: within queue_limit=8
    responses = await asyncio.gather(*(served.client.post("/predict", files={"file": ("x.jpeg", d)}) for d in datas))
    for data, r in zip(datas, responses, strict=True):
        assert r.status_code == 200, r.text
        got = [r.json()["probabilities"][c] for c in MANIFEST.classes]
        np.testing.assert_allclose(got, direct(data), atol=1e-5)
    assert served.state.current().free_slots == served.state.settings.queue_limit


async def test_predict_many_mixed_good_and_bad_in_upload_order(served: Served, real_images: list[Path]) -> None:
    good = [p.read_bytes() for p in real_images]
    too_many_pixels = encode(Image.new("RGB", (1100, 1000)), "PNG")
    files = [
        ("files", ("good-0.jpeg", good[0], "image/jpeg")),
        ("files", ("notes.txt", b"not an image at all", "text/plain")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("good-1.jpeg", good[1], "image/jpeg")),
        ("files", ("huge.bin", b"\xff" * 300_001, "application/octet-stream")),
        ("files", ("cut.jpeg", truncated_jpeg(), "image/jpeg")),
        ("files", ("wide.png", too_many_pixels, "image/png")),
    ]
    r = await served.client.post("/predict-many", files=files, data={"comment": "ignored"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [f[1][0] for f in files]
    codes = [x["error"]["code"] if "error" in x else "ok" for x in results]
    assert codes == [
        "ok",
        "invalid_image",
        "invalid_image",
        "ok",
        "image_too_large",
        "invalid_image",
        "image_too_large",
    ]
    for x, data in ((results[0], good[0]), (results[3], good[1])):
        np.testing.assert_allclose([x["probabilities"][c] for c in MANIFEST.classes], direct(data), atol=1e-5)
        assert x["model"]["version"] == MANIFEST.version
        assert (x["decision"], x["reason"]) == ("accept", None)
    # Every reserved slot came back: the failed files' slots too.
    assert served.state.current().free_slots == served.state.settings.queue_limit


# --- bad input: always a 4xx JSON error, never a 500 ----------------------------------------

BAD_PREDICT: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty file", {"files": {"file": ("a.jpeg", b"")}}, 422, "invalid_image"),
    ("not an image", {"files": {"file": ("a.jpeg", b"%PDF-1.7 definitely not")}}, 422, "invalid_image"),
    ("truncated", {"files": {"file": ("a.jpeg", truncated_jpeg())}}, 422, "invalid_image"),
    ("too many bytes", {"files": {"file": ("a.bin", b"\x00" * 300_001)}}, 413, "image_too_large"),
    (
        "too many pixels",
        {"files": {"file": ("a.png", encode(Image.new("L", (1001, 1000)), "PNG"))}},
        413,
        "image_too_large",
    ),
    ("wrong field name", {"files": {"image": ("a.jpeg", noise_jpeg())}}, 422, "missing_field"),
    ("text field named file", {"data": {"file": "hello"}, "files": {"other": ("x", b"x")}}, 422, "invalid_image"),
    ("form without the field", {"data": {"note": "hello"}, "files": {"other": ("x", b"x")}}, 422, "missing_field"),
    (
        "two files",
        {"files": [("file", ("a.jpeg", noise_jpeg())), ("file", ("b.jpeg", noise_jpeg()))]},
        413,
        "too_many_files",
    ),
    ("json body", {"json": {"file": "aGVsbG8="}}, 415, "unsupported_media_type"),
    ("no body", {}, 415, "unsupported_media_type"),
    (
        "raw image body",
        {"content": noise_jpeg(), "headers": {"content-type": "image/jpeg"}},
        415,
        "unsupported_media_type",
    ),
    (
        "malformed multipart",
        {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        400,
        "bad_request",
    ),
    ("no boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_request"),
]


@pytest.mark.parametrize(("case", "kwargs", "status", "code"), BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
async def test_predict_bad_input(served: Served, case: str, kwargs: dict[str, Any], status: int, code: str) -> None:
    r = await served.client.post("/predict", **kwargs)
    assert_error(r, status, code)
    assert served.state.current().free_slots == served.state.settings.queue_limit


async def test_predict_many_limits(served: Served) -> None:
    nine = [("files", (f"{i}.jpeg", noise_jpeg(32, i))) for i in range(9)]
    assert_error(await served.client.post("/predict-many", files=nine), 413, "too_many_files")
    assert_error(
        await served.client.post("/predict-many", files={"file": ("a.jpeg", noise_jpeg())}), 422, "missing_field"
    )


async def test_predict_many_whole_body_limit() -> None:
    async with serve(make_settings(max_request_bytes=400_000)) as s:
        files = [("files", (f"{i}.bin", b"\x00" * 250_000)) for i in range(2)]
        assert_error(await s.client.post("/predict-many", files=files), 413, "request_too_large")


# --- overload, deadline, readiness ---------------------------------------------------------


async def test_full_queue_answers_503_before_reading_or_decoding(served: Served, real_images: list[Path]) -> None:
    runtime = served.state.current()
    held = runtime.reserve(runtime.free_slots)  # every slot taken
    try:
        # Garbage bodies: a 4xx here would prove that decode or parsing happened first.
        r = await served.client.post("/predict", files={"file": ("a.jpeg", b"garbage")})
        err = assert_error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        assert "capacity" in err["message"]
        r = await served.client.post("/predict-many", files=[("files", ("a.jpeg", b"garbage"))])
        assert_error(r, 503, "overloaded")
        assert "retry-after" in r.headers
    finally:
        held.release()
    r = await served.client.post("/predict", files={"file": ("a.jpeg", real_images[0].read_bytes())})
    assert r.status_code == 200


async def test_deadline_answers_504_and_frees_the_slot() -> None:
    async with serve(make_settings(request_deadline_s=0.05)) as s:
        never = asyncio.Event()

        r = await post_stalled_upload(s.client, never)  # the client never finishes its upload
        assert_error(r, 504, "deadline_exceeded")
        assert s.state.current().free_slots == s.state.settings.queue_limit
        never.set()


async def test_not_ready_before_startup_and_after_shutdown(real_images: list[Path]) -> None:
    app = create_app(make_settings())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lungserve.test")
    async with client:
        # The lifespan has not run: nothing is loaded or warm.
        assert (await client.get("/health/live")).status_code == 200
        assert_error(await client.get("/health/ready"), 503, "model_not_ready")
        assert_error(await client.get("/model"), 503, "model_not_ready")
        assert_error(await client.post("/predict", files={"file": ("a", b"x")}), 503, "model_not_ready")
        async with LifespanManager(app, startup_timeout=LIFESPAN_TIMEOUT_S, shutdown_timeout=LIFESPAN_TIMEOUT_S):
            ready = await client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["provider"] == "CPUExecutionProvider"
        # Shut down: the batcher has drained and stopped.
        assert_error(await client.get("/health/ready"), 503, "shutting_down")
        r = await client.post("/predict", files={"file": ("a", real_images[0].read_bytes())})
        assert_error(r, 503, "shutting_down")
        assert (await client.get("/health/live")).status_code == 200


async def test_model_endpoint(served: Served) -> None:
    r = await served.client.get("/model")
    assert r.status_code == 200
    body = r.json()
    assert body["manifest"] == MANIFEST.dump()
    assert body["provider"] == "CPUExecutionProvider"
    assert body["batching"] == {
        "max_batch_size": 4,
        "max_batch_delay_s": 0.005,
        "queue_limit": 8,
        "max_in_flight_batches": 2,
        "request_deadline_s": 60.0,
    }
    assert body["limits"]["max_files_per_request"] == 8
    assert body["source"]["sha256"] == MANIFEST.sha256


# --- start-up failures ------------------------------------------------------------------------


async def test_cuda_policy_refuses_to_start_here() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA build of onnxruntime")
    app = create_app(make_settings(provider="cuda"))
    with pytest.raises(ProviderUnavailable):
        async with LifespanManager(app, startup_timeout=LIFESPAN_TIMEOUT_S):
            pass


async def test_a_model_that_fails_verification_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text((BUNDLED_MODEL / "model.json").read_text())
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    app = create_app(make_settings(model_uri=str(tmp_path)))
    with pytest.raises(ModelSourceError, match="checksum"):
        async with LifespanManager(app, startup_timeout=LIFESPAN_TIMEOUT_S):
            pass


# --- the error shape for everything else ---------------------------------------------------


async def test_framework_errors_use_the_same_shape(served: Served) -> None:
    assert_error(await served.client.get("/no-such-route"), 404, "not_found")
    r = await served.client.get("/predict")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


async def test_validation_errors_and_unexpected_exceptions_use_the_same_shape() -> None:
    app = create_app(make_settings())

    @app.get("/items/{n}")
    async def item(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug with a secret detail")

    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://lungserve.test") as client:
        err = assert_error(await client.get("/items/abc"), 422, "validation_error")
        assert "n" in err["message"]
        err = assert_error(await client.get("/boom"), 500, "internal_error")
        assert "secret" not in err["message"]


# --- documentation ----------------------------------------------------------------------------


async def test_openapi_documents_the_multipart_bodies_and_examples(served: Served) -> None:
    spec = (await served.client.get("/openapi.json")).json()
    predict = spec["paths"]["/predict"]["post"]
    schema = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"]
    many = spec["paths"]["/predict-many"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert many["properties"]["files"]["type"] == "array"
    for code in ("413", "422", "503", "504"):
        assert code in predict["responses"]
    assert spec["components"]["schemas"]["PredictionResponse"]["examples"]
    assert {"/health/live", "/health/ready", "/model"} <= set(spec["paths"])
    assert (await served.client.get("/docs")).status_code == 200
