"""Slide jobs in-process: a tiled BigTIFF made here, its tiles' classes, progress, cancel, resume, keys, errors.

Synchronisation is on the job state endpoint (polled until a state or a count) and on the
batcher's queue: a test that needs a job to stay running holds every queue slot itself (an
interactive reservation), so the job's tissue tiles cannot be admitted until it lets go.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.core.model_client import Slots
from tests.app.conftest import Served, make_settings, serve
from tests.images import noise
from tests.slides import CELL, cell_image, spread, write_slide

pytestmark = pytest.mark.anyio

POLL_S = 0.05
SAFETY_S = 180.0
COLUMNS, ROWS = 8, 6  # a 6,144 x 4,608 slide: 48 tiles


def jobs_settings(**overrides: Any) -> Any:
    values: dict[str, Any] = {"queue_limit": 8, "jobs_checkpoint_tiles": 4}
    values.update(overrides)
    return make_settings(**values)


async def wait_for(
    s: Served, job_id: str, done: Callable[[dict[str, Any]], bool], headers: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every status seen, polling GET /jobs/{id} until `done(status)`."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(SAFETY_S):
        while True:
            response = await s.client.get(f"/jobs/{job_id}", headers=headers)
            assert response.status_code == 200, response.text
            seen.append(response.json())
            if done(seen[-1]):
                return seen
            await asyncio.sleep(POLL_S)


def state_is(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status["state"] in states


@pytest.fixture(scope="module")
def real_cells(lc25000_768: Path) -> list[tuple[str, NDArray[np.uint8]]]:
    return [(p.parent.name, cell_image(p)) for p in sorted(lc25000_768.glob("*/*.jpeg"))]


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Noise tissue (never background) in 10 of the 48 cells, all in the last three rows: a job
    whose tissue tiles cannot be admitted still gets through the 24 glass tiles before them."""
    places = [(c, r + 3) for c, r in spread(10, COLUMNS, 3, seed=1)]
    cells = {c: np.asarray(noise(CELL, seed=i)) for i, c in enumerate(places)}
    return write_slide(tmp_path_factory.mktemp("slide") / "synthetic.tif", COLUMNS * CELL, ROWS * CELL, cells)


async def submit(s: Served, path: Path, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    with path.open("rb") as fh:
        response = await s.client.post("/jobs", files={"file": (path.name, fh, "image/tiff")}, headers=headers)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["location"] == body["status_url"]
    return body


def metric(s: Served, name: str, **labels: str) -> float:
    text = s.app.state.metrics.exposition()[0].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exposed")


def hold_the_queue(s: Served) -> Slots:
    """Every slot, as interactive requests would hold them: job tiles wait (low priority)."""
    model = s.state.current()
    return model.reserve(model.free_slots)


async def test_a_slide_job_classifies_every_tissue_tile_and_exports_for_qupath(
    real_cells: list[tuple[str, NDArray[np.uint8]]], tmp_path: Path
) -> None:
    places = spread(8, COLUMNS, ROWS, seed=2)
    truth = {(c * CELL, r * CELL): real_cells[i % len(real_cells)][0] for i, (c, r) in enumerate(places)}
    cells = {p: real_cells[i % len(real_cells)][1] for i, p in enumerate(places)}
    slide = write_slide(tmp_path / "slide.tif", COLUMNS * CELL, ROWS * CELL, cells)
    async with serve(jobs_settings()) as s:
        job = await submit(s, slide)
        assert job["state"] in ("queued", "running")
        seen = await wait_for(s, job["id"], state_is("done", "failed", "cancelled"))
        assert seen[-1]["state"] == "done", seen[-1]
        done = [x["progress"]["tiles_done"] for x in seen]
        assert done == sorted(done)  # progress only goes up
        assert seen[-1]["progress"] == {"tiles_done": 48, "tiles_total": 48}
        assert seen[-1]["started"] is not None
        assert seen[-1]["finished"] is not None

        result = (await s.client.get(f"/jobs/{job['id']}/result")).json()
        tiles = {(t["x"], t["y"]): t for t in result["tiles"]}
        assert set(tiles) == set(truth)  # every tissue tile listed, no glass
        right = sum(tiles[xy]["label"] == label for xy, label in truth.items())
        assert right / len(truth) >= 0.9
        for t in result["tiles"]:
            assert (t["width"], t["height"]) == (CELL, CELL)
            assert sum(t["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            assert t["decision"] in ("accept", "refer")
        summary = result["summary"]
        assert (summary["tiles"], summary["tissue_tiles"], summary["background_tiles"]) == (48, 8, 40)
        assert (result["width"], result["height"], result["source"]["reader"]) == (6144, 4608, "openslide")

        response = await s.client.get(f"/jobs/{job['id']}/result.geojson")
        assert response.headers["content-type"].startswith("application/geo+json")
        check_qupath_feature_collection(response.json(), result)

        png = await s.client.get(f"/jobs/{job['id']}/classmap.png")
        assert png.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(png.content)) as picture:
            assert picture.width == 1024  # the slide's longer side, scaled to the picture

        listed = (await s.client.get("/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert metric(s, "lungserve_job_tiles_total", kind="tissue") == 8
        assert metric(s, "lungserve_job_tiles_total", kind="background") == 40
        assert metric(s, "lungserve_jobs", state="done") == 1
        assert metric(s, "lungserve_job_duration_seconds_count", state="done") == 1


def check_qupath_feature_collection(collection: dict[str, Any], result: dict[str, Any]) -> None:
    """What QuPath's GeoJSON import reads: Features with a closed Polygon in full-resolution
    pixels, properties.objectType, classification {name, color [r, g, b]}, numeric measurements."""
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(result["tiles"])
    for feature, tile in zip(features, result["tiles"], strict=True):
        assert feature["type"] == "Feature"
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        x, y, w, h = tile["x"], tile["y"], tile["width"], tile["height"]
        assert ring == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        props = feature["properties"]
        assert props["objectType"] in ("annotation", "detection", "tile")
        colour = props["classification"]["color"]
        assert len(colour) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        refer = tile["decision"] == "refer"
        assert props["classification"]["name"] == tile["label"] + (": refer" if refer else "")
        measurements = props["measurements"]
        assert all(isinstance(v, int | float) for v in measurements.values())
        assert measurements["refer"] == int(refer)
        for name, p in tile["probabilities"].items():
            assert measurements[f"p_{name}"] == pytest.approx(p, abs=1e-5)


async def test_jobs_wait_their_turn_and_cancel_while_queued_or_running(synthetic_slide: Path) -> None:
    async with serve(jobs_settings(jobs_concurrency=1)) as s:
        with hold_the_queue(s):
            first = await submit(s, synthetic_slide)
            second = await submit(s, synthetic_slide)
            await wait_for(s, first["id"], lambda x: x["state"] == "running" and x["progress"]["tiles_done"] > 0)
            assert (await s.client.get(f"/jobs/{second['id']}")).json()["state"] == "queued"  # one at a time

            cancelled = await s.client.delete(f"/jobs/{second['id']}")
            assert cancelled.status_code == 200
            assert cancelled.json()["state"] == "cancelled"
            running = await s.client.delete(f"/jobs/{first['id']}")
            assert running.json()["state"] == "cancelled"
            assert running.json()["progress"]["tiles_done"] < 48
        again = await s.client.delete(f"/jobs/{first['id']}")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "job_conflict"
        result = await s.client.get(f"/jobs/{first['id']}/result")
        assert result.status_code == 409
        assert metric(s, "lungserve_jobs", state="cancelled") == 2


async def test_a_job_stopped_with_the_server_resumes_from_its_checkpoints(synthetic_slide: Path) -> None:
    settings = jobs_settings()
    async with serve(settings) as s:
        with hold_the_queue(s):
            job = await submit(s, synthetic_slide)
            await wait_for(s, job["id"], lambda x: x["progress"]["tiles_done"] >= 8)
        # The app stops with the job running: its finished tiles are checkpointed.
    async with serve(settings) as s:
        seen = await wait_for(s, job["id"], state_is("done", "failed", "cancelled"))
        assert seen[-1]["state"] == "done"
        record = s.app.state.jobs.get(None, job["id"])
        assert record.resumed_from >= 8
        # This server did only the tiles the checkpoints lacked: none twice.
        redone = metric(s, "lungserve_job_tiles_total", kind="tissue") + metric(
            s, "lungserve_job_tiles_total", kind="background"
        )
        assert redone == 48 - record.resumed_from
        result = (await s.client.get(f"/jobs/{job['id']}/result")).json()
        assert result["summary"]["tissue_tiles"] == 10


async def test_a_job_belongs_to_the_key_that_created_it(synthetic_slide: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("lab:lab-key-0123456789abcdef\nother:other-key-0123456789abcdef\n")
    lab, other = {"X-API-Key": "lab-key-0123456789abcdef"}, {"X-API-Key": "other-key-0123456789abcdef"}
    async with serve(jobs_settings(api_keys_file=keys)) as s:
        assert (await s.client.get("/jobs")).status_code == 401
        job = await submit(s, synthetic_slide, headers=lab)
        for method, path in (("GET", ""), ("GET", "/result"), ("GET", "/classmap.png"), ("DELETE", "")):
            response = await s.client.request(method, f"/jobs/{job['id']}{path}", headers=other)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["code"] == "not_found"
        assert (await s.client.get("/jobs", headers=other)).json() == {"jobs": []}
        await wait_for(s, job["id"], state_is("done"), headers=lab)


async def test_bad_requests_get_clear_4xx_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.tif"
    garbage.write_bytes(b"not a slide at all")
    big = write_slide(tmp_path / "big.tif", 4 * CELL, 2 * CELL, {})
    async with serve(jobs_settings(jobs_max_tiles=4)) as s:
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"files": {"file": ("a.tif", garbage.read_bytes(), "image/tiff")}}, 422, "invalid_image"),
            ({"files": {"file": ("a.tif", b"", "image/tiff")}}, 422, "invalid_image"),
            ({"files": {"file": ("b.tif", big.read_bytes(), "image/tiff")}}, 413, "too_many_tiles"),
            ({"json": {"uri": "https://example.org/slide.svs"}}, 422, "invalid_job_request"),
            ({"json": {"uri": "s3://bucket/"}}, 422, "invalid_job_request"),
            ({"json": ["s3://bucket/key"]}, 422, "invalid_job_request"),
            ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid_job_request"),
            ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ]
        for kwargs, status, code in cases:
            response = await s.client.post("/jobs", **kwargs)
            assert response.status_code == status, (kwargs.keys(), response.text)
            assert response.json()["error"]["code"] == code
        for path in ("/jobs/0123", "/jobs/" + "a" * 32, "/jobs/" + "a" * 32 + "/result.geojson"):
            response = await s.client.get(path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        assert (await s.client.get("/jobs")).json() == {"jobs": []}  # nothing was stored


async def test_job_tiles_never_hold_more_than_their_share_of_the_queue(synthetic_slide: Path) -> None:
    # queue_limit 8 x share 0.25: job tiles hold at most 2 slots, whatever the slide's size.
    async with serve(jobs_settings(jobs_queue_share=0.25)) as s:
        model = s.state.current()
        job = await submit(s, synthetic_slide)
        held: list[int] = []

        def sample(status: dict[str, Any]) -> bool:
            held.append(model.queue_limit - model.free_slots)
            return status["state"] in ("done", "failed", "cancelled")

        seen = await wait_for(s, job["id"], sample)
        assert seen[-1]["state"] == "done"
        assert max(held) <= 2  # the other 6 slots stay free for interactive requests


async def test_a_plain_stripped_tiff_runs_band_by_band(tmp_path: Path) -> None:
    import tifffile

    canvas = np.full((2 * CELL, 4 * CELL, 3), 246, dtype=np.uint8)
    canvas[:CELL, CELL : 2 * CELL] = np.asarray(noise(CELL, seed=5))
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, canvas, photometric="rgb", compression="zlib", rowsperstrip=64)
    async with serve(jobs_settings(max_image_pixels=1_000_000)) as s:  # over Pillow's limit: not decoded whole
        job = await submit(s, path)
        seen = await wait_for(s, job["id"], state_is("done", "failed", "cancelled"))
        assert seen[-1]["state"] == "done", seen[-1]
        result = (await s.client.get(f"/jobs/{job['id']}/result")).json()
        assert result["source"]["reader"] == "tiff-strips"
        assert [(t["x"], t["y"]) for t in result["tiles"]] == [(CELL, 0)]
