"""POST /analyze in-process: real tiles of a mosaic, a pyramidal TIFF, background, limits."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.pathology.overlay import LEGEND_HEIGHT
from service.settings import Settings
from tests.app.conftest import make_settings, serve
from tests.images import encode
from tests.onnx_models import write_model_dir
from tests.unit.test_slide import write_pyramid

pytestmark = pytest.mark.anyio

QUADRANTS = ((0, 0), (768, 0), (0, 768), (768, 768))


@pytest.fixture(scope="module")
def mosaic(lc25000_768: Path) -> tuple[np.ndarray, list[str]]:
    """The four 768 px originals as a 2x2 mosaic, and the class of each quadrant."""
    originals = sorted(lc25000_768.glob("*/*.jpeg"))
    assert len(originals) == 4
    canvas = np.zeros((1536, 1536, 3), dtype=np.uint8)
    for (x, y), path in zip(QUADRANTS, originals, strict=True):
        canvas[y : y + 768, x : x + 768] = np.asarray(Image.open(path).convert("RGB"))
    return canvas, [p.parent.name for p in originals]


@pytest.fixture(scope="module")
def mosaic_png(mosaic: tuple[np.ndarray, list[str]]) -> bytes:
    return encode(Image.fromarray(mosaic[0]), "PNG")


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"max_file_bytes": 20_000_000, "max_request_bytes": 40_000_000}
    values["max_image_pixels"] = 20_000_000
    values.update(overrides)
    return make_settings(**values)


def _by_origin(body: dict[str, object]) -> dict[tuple[int, int], str]:
    tiles = body["tiles"]
    assert isinstance(tiles, list)
    return {(t["x"], t["y"]): t["label"] for t in tiles}


async def test_each_quadrant_of_a_mosaic_gets_its_class(
    mosaic: tuple[np.ndarray, list[str]], mosaic_png: bytes
) -> None:
    _, classes = mosaic
    async with serve(_settings()) as s:
        response = await s.client.post("/analyze", files={"file": ("mosaic.png", mosaic_png, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"], body["tile_source_px"]) == (1536, 1536, 768)
    assert body["source"]["reader"] == "pillow"
    assert _by_origin(body) == dict(zip(QUADRANTS, classes, strict=True))
    for tile in body["tiles"]:
        assert (tile["width"], tile["height"]) == (768, 768)
        assert sum(tile["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert tile["decision"] in ("accept", "refer")
    summary = body["summary"]
    assert (summary["tiles"], summary["tissue_tiles"], summary["background_tiles"]) == (4, 4, 0)
    assert summary["tissue_share"] == {c: classes.count(c) / 4 for c in ("lung_aca", "lung_n", "lung_scc")}
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    # The thumbnail's longer side is 1024 px; the legend strip sits under the map.
    assert overlay.size == (1024, 1024 + LEGEND_HEIGHT) == (body["overlay_width"], body["overlay_height"])


async def test_a_pyramidal_tiff_is_read_through_openslide(mosaic: tuple[np.ndarray, list[str]], tmp_path: Path) -> None:
    canvas, classes = mosaic
    path = tmp_path / "mosaic.tif"
    write_pyramid(path, canvas)
    # The pixel limit is for plain images: a pyramid is read tile by tile, whatever its size.
    async with serve(_settings(max_image_pixels=1_000)) as s:
        response = await s.client.post("/analyze", files={"file": ("mosaic.tif", path.read_bytes(), "image/tiff")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"]["reader"] == "openslide"
    assert body["source"]["levels"] == 3
    assert _by_origin(body) == dict(zip(QUADRANTS, classes, strict=True))


async def test_white_tiles_are_skipped_and_counted(mosaic: tuple[np.ndarray, list[str]]) -> None:
    canvas, _ = mosaic
    glass = canvas.copy()
    glass[768:, 768:] = 242  # the bottom-right quadrant is empty glass
    async with serve(_settings()) as s:
        response = await s.client.post(
            "/analyze", files={"file": ("glass.png", encode(Image.fromarray(glass), "PNG"), "image/png")}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (768, 768) not in _by_origin(body)
    assert body["summary"]["background_tiles"] == 1
    assert body["summary"]["tissue_tiles"] == 3


@pytest.fixture
def tiny_tiles(tmp_path: Path) -> Path:
    """A model whose tiles are 16 source px, so a small image has many tiles."""
    write_model_dir(tmp_path / "m", tile_source_px=16)
    return tmp_path / "m"


async def test_more_tiles_than_the_queue_can_ever_admit_is_a_413(tiny_tiles: Path) -> None:
    image = Image.new("RGB", (160, 160), (120, 60, 140))  # 100 tiles; the queue holds 8
    async with serve(_settings(model_uri=str(tiny_tiles))) as s:
        response = await s.client.post("/analyze", files={"file": ("big.png", encode(image, "PNG"), "image/png")})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_tiles"


async def test_tiles_come_from_the_manifest_and_edges_shift_inward(tiny_tiles: Path) -> None:
    image = Image.new("RGB", (40, 20), (120, 60, 140))
    async with serve(_settings(model_uri=str(tiny_tiles))) as s:
        response = await s.client.post("/analyze", files={"file": ("small.png", encode(image, "PNG"), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tile_source_px"] == 16
    assert sorted(_by_origin(body)) == [(0, 0), (0, 4), (16, 0), (16, 4), (24, 0), (24, 4)]


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [(b"", 422, "invalid_image"), (b"not an image", 422, "invalid_image")],
)
async def test_bad_input_is_a_clear_4xx(payload: bytes, status: int, code: str) -> None:
    async with serve(_settings()) as s:
        response = await s.client.post("/analyze", files={"file": ("x.bin", payload, "application/octet-stream")})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


async def test_a_plain_image_over_the_pixel_limit_is_a_413() -> None:
    image = Image.new("RGB", (2000, 1000), (120, 60, 140))
    async with serve(_settings(max_image_pixels=1_000_000)) as s:
        response = await s.client.post("/analyze", files={"file": ("big.png", encode(image, "PNG"), "image/png")})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "image_too_large"


async def test_referred_tiles_carry_the_cores_decision(mosaic_png: bytes) -> None:
    # A confidence bar no answer reaches: every tissue tile is referred, as /predict would refer it.
    async with serve(_settings(refer_below=0.999999)) as s:
        response = await s.client.post("/analyze", files={"file": ("mosaic.png", mosaic_png, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert {(t["decision"], t["reason"]) for t in body["tiles"]} == {("refer", "low_confidence")}
    assert body["summary"]["referred_tiles"] == 4
