"""POST /explain in-process: Grad-CAM numbers and overlay from ORT outputs, and its errors."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.model.preprocess import load_image
from service.pathology.gradcam import class_activation, normalised
from tests.app.conftest import Served, make_settings, serve
from tests.images import encode, noise_jpeg
from tests.onnx_models import cam_model_bytes, write_cam_model_dir, write_model_dir

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cam_served(tmp_path: Path) -> AsyncIterator[Served]:
    write_cam_model_dir(tmp_path / "model", input_size=32)
    async with serve(make_settings(model_uri=str(tmp_path / "model"))) as s:
        yield s


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


async def test_explain_returns_the_prediction_and_the_contract_map(cam_served: Served) -> None:
    data = noise_jpeg(96, seed=4)
    response = await cam_served.client.post("/explain", files={"file": ("tile.jpeg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    session = ort.InferenceSession(cam_model_bytes(32), providers=["CPUExecutionProvider"])
    probs, fmaps, weights = session.run(None, {"image": load_image(data, 32)[None]})
    predicted = int(np.argmax(probs[0]))
    assert body["label"] == ["lung_aca", "lung_n", "lung_scc"][predicted]
    assert body["probabilities"][body["label"]] == pytest.approx(float(probs[0, predicted]), abs=1e-6)
    assert body["decision"] in ("accept", "refer")  # made by the core, as for /predict
    explanation = body["explanation"]
    assert explanation["method"] == "grad-cam"
    assert explanation["class"] == body["label"]
    expected = normalised(class_activation(fmaps[0], weights[0], predicted))
    np.testing.assert_allclose(np.array(explanation["grid"]), expected, atol=1e-4)
    overlay = _png(explanation["overlay_png"])
    assert overlay.format == "PNG"
    assert overlay.size == (96, 96) == (explanation["overlay_width"], explanation["overlay_height"])


async def test_explain_a_class_that_was_not_predicted(cam_served: Served) -> None:
    data = noise_jpeg(64, seed=5)
    maps = {}
    for cls in ("lung_aca", "lung_n"):
        response = await cam_served.client.post(
            "/explain", params={"class": cls}, files={"file": ("t.jpeg", data, "image/jpeg")}
        )
        assert response.status_code == 200, response.text
        assert response.json()["explanation"]["class"] == cls
        maps[cls] = np.array(response.json()["explanation"]["grid"])
    assert not np.allclose(maps["lung_aca"], maps["lung_n"])


async def test_unknown_class_is_a_422(cam_served: Served) -> None:
    response = await cam_served.client.post(
        "/explain", params={"class": "colon_aca"}, files={"file": ("t.jpeg", noise_jpeg(32), "image/jpeg")}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_class"


async def test_not_an_image_is_a_422(cam_served: Served) -> None:
    response = await cam_served.client.post("/explain", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_image"


async def test_a_tall_image_gets_an_overlay_of_its_own_shape(cam_served: Served) -> None:
    img = Image.new("RGB", (300, 900), (200, 120, 160))
    response = await cam_served.client.post("/explain", files={"file": ("tall.png", encode(img, "PNG"), "image/png")})
    assert response.status_code == 200, response.text
    assert _png(response.json()["explanation"]["overlay_png"]).size == (128, 384)


async def test_a_model_without_gradcam_outputs_answers_409_before_reading(tmp_path: Path) -> None:
    write_model_dir(tmp_path / "v1")  # probabilities only, like model v1
    async with serve(make_settings(model_uri=str(tmp_path / "v1"))) as s:
        response = await s.client.post("/explain", files={"file": ("t.jpeg", noise_jpeg(64), "image/jpeg")})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "explain_unavailable"
    assert "feature_maps" in error["message"]
    assert error["request_id"]
