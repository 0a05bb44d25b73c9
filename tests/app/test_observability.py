"""Metrics, request ids, Server-Timing and logs of the real app, in-process.

Counters are read from the app's own registry (`app.state.metrics`): a fresh one per app,
so every expected delta is exact.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.app import create_app
from service.model.manifest import Manifest
from service.observability.metrics import Metrics
from tests.app.conftest import Served, make_settings, post_stalled_upload, serve
from tests.conftest import BUNDLED_MODEL
from tests.images import noise_jpeg
from tests.onnx_models import write_model_dir

pytestmark = pytest.mark.anyio

MANIFEST = Manifest.read(BUNDLED_MODEL / "model.json")
# A file name that could identify a patient: it must never reach a log line.
SECRET = "patient_jane_doe_19620412"
SERVER_TIMING = re.compile(r"^queue;dur=\d+\.\d{3}, decode;dur=\d+\.\d{3}, infer;dur=\d+\.\d{3}$")
TOKEN = "observability-admin-token"

WATCHED: list[tuple[str, dict[str, str]]] = [
    ("lungserve_requests_total", {"route": "/predict", "status": "2xx"}),
    ("lungserve_requests_total", {"route": "/predict", "status": "4xx"}),
    ("lungserve_requests_total", {"route": "/predict-many", "status": "2xx"}),
    ("lungserve_requests_total", {"route": "unmatched", "status": "4xx"}),
    ("lungserve_request_duration_seconds_count", {"route": "/predict"}),
    ("lungserve_images_total", {"outcome": "ok"}),
    ("lungserve_images_total", {"outcome": "invalid"}),
    ("lungserve_rejected_total", {"reason": "bad_input"}),
    ("lungserve_rejected_total", {"reason": "queue_full"}),
    ("lungserve_batch_size_sum", {}),
    ("lungserve_queue_wait_seconds_count", {}),
    ("lungserve_decode_seconds_count", {}),
]


def metrics_of(served: Served) -> Metrics:
    m: Metrics = served.app.state.metrics
    return m


def sample(served: Served, name: str, **labels: str) -> float:
    return metrics_of(served).registry.get_sample_value(name, labels) or 0.0


def snapshot(served: Served) -> dict[str, float]:
    return {f"{n}{sorted(labels.items())}": sample(served, n, **labels) for n, labels in WATCHED}


def model_info(m: Metrics) -> list[Sample]:
    return next(f for f in m.registry.collect() if f.name == "lungserve_model_info").samples


def jpeg(seed: int) -> bytes:
    return noise_jpeg(64, seed=seed)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
async def logged(server_log: io.StringIO) -> AsyncIterator[tuple[Served, io.StringIO]]:
    async with serve(make_settings()) as s:
        yield s, server_log


# --- exact counts -------------------------------------------------------------------------


async def test_known_requests_move_every_counter_by_the_exact_amount(served: Served) -> None:
    before = snapshot(served)
    c = served.client
    good = await asyncio.gather(*(c.post("/predict", files={"file": ("a.jpeg", jpeg(i))}) for i in range(3)))
    invalid = await c.post("/predict", files={"file": ("b.jpeg", b"not an image")})
    many = await c.post(
        "/predict-many",
        files=[
            ("files", ("c.jpeg", jpeg(10))),
            ("files", ("d.jpeg", jpeg(11))),
            ("files", ("e.txt", b"not an image either")),
        ],
    )
    missing = await c.post("/predict", files={"wrong_field": ("f.jpeg", jpeg(12))})
    nowhere = await c.get("/no/such/route")

    assert [r.status_code for r in good] == [200, 200, 200]
    assert (invalid.status_code, many.status_code, missing.status_code, nowhere.status_code) == (422, 200, 422, 404)
    labels = [r.json()["label"] for r in good] + [x["label"] for x in many.json()["results"] if "label" in x]
    assert len(labels) == 5

    after = snapshot(served)
    delta = {k: after[k] - before[k] for k in after}
    assert list(delta.values()) == [
        3,  # /predict 2xx
        2,  # /predict 4xx: the invalid image and the missing field
        1,  # /predict-many 2xx (one of its files was bad: still a 200)
        1,  # the unknown path, as route="unmatched"
        5,  # /predict durations
        5,  # images ok
        2,  # images invalid: one per route
        1,  # rejected as bad input: the request without a `file` field
        0,  # never full
        5,  # batch sizes add up to the images classified
        5,  # one queue wait per image
        5,  # one decode per decodable image
    ]
    for label, n in Counter(labels).items():
        assert sample(served, "lungserve_predictions_total", label=label) == n
    assert sample(served, "lungserve_inference_seconds_count") == sample(served, "lungserve_batch_size_count")
    assert sample(served, "lungserve_queue_depth") == 0
    assert sample(served, "lungserve_batches_in_flight") == 0


async def test_metrics_endpoint_serves_the_same_numbers_in_prometheus_format(served: Served) -> None:
    await served.client.post("/predict", files={"file": ("a.jpeg", jpeg(0))})
    r = await served.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    [ok] = [s for s in families["lungserve_images"].samples if s.labels.get("outcome") == "ok"]
    assert ok.value == 1
    [info] = families["lungserve_model_info"].samples
    assert info.labels == {
        "name": MANIFEST.name,
        "version": MANIFEST.version,
        "sha256": MANIFEST.sha256[:12],
        "provider": "CPUExecutionProvider",
    }
    assert families["lungserve_model_ready"].samples[0].value == 1
    buckets = [s.labels["le"] for s in families["lungserve_batch_size"].samples if s.name.endswith("_bucket")]
    assert buckets == ["1.0", "2.0", "4.0", "+Inf"]  # max_batch_size=4 in these tests


async def test_rejections_are_counted_by_reason(served: Served) -> None:
    runtime = served.state.current()
    held = runtime.reserve(runtime.free_slots)  # every slot taken
    try:
        r1 = await served.client.post("/predict", files={"file": ("a.jpeg", jpeg(0))})
        r2 = await served.client.post("/predict-many", files=[("files", ("a.jpeg", jpeg(0)))])
    finally:
        held.release()
    assert (r1.status_code, r2.status_code) == (503, 503)
    assert sample(served, "lungserve_rejected_total", reason="queue_full") == 2
    assert sample(served, "lungserve_requests_total", route="/predict", status="5xx") == 1
    assert sample(served, "lungserve_images_total", outcome="ok") == 0


async def test_deadline_is_a_rejection_by_reason() -> None:
    async with serve(make_settings(request_deadline_s=0.05)) as s:
        never = asyncio.Event()

        r = await post_stalled_upload(s.client, never)  # the client never finishes its upload
        never.set()
        assert r.status_code == 504
        assert sample(s, "lungserve_rejected_total", reason="deadline") == 1


async def test_ready_gauge_and_model_info_follow_the_lifespan_and_a_reload(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_model_dir(folder, version="v1", bias=[3.0, 0.0, 0.0])
    async with serve(make_settings(model_uri=str(folder), admin_token=TOKEN)) as s:
        m = metrics_of(s)
        assert sample(s, "lungserve_model_ready") == 1
        [v1] = model_info(m)
        assert v1.labels["version"] == "v1"

        write_model_dir(folder, version="v2", bias=[0.0, 3.0, 0.0])
        r = await s.client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        [v2] = model_info(m)
        assert v2.labels["version"] == "v2"  # v1's series is gone: exactly one is 1
        assert v2.labels["sha256"] != v1.labels["sha256"]
        await s.client.post("/predict", files={"file": ("a.jpeg", jpeg(0))})
        # The displaced batcher drained to zero; the new one is idle again.
        assert sample(s, "lungserve_queue_depth") == 0
        assert sample(s, "lungserve_batches_in_flight") == 0
    assert sample(s, "lungserve_model_ready") == 0


# --- request ids and Server-Timing ---------------------------------------------------------


async def test_request_id_is_echoed_in_headers_and_error_bodies(served: Served) -> None:
    c = served.client
    ok = await c.post("/predict", files={"file": ("a.jpeg", jpeg(0))}, headers={"X-Request-ID": "lab-7:run/42"})
    assert ok.headers["x-request-id"] == "lab-7:run/42"

    bad = await c.post("/predict", files={"file": ("a.jpeg", b"nope")}, headers={"X-Request-ID": "lab-7-b"})
    assert bad.status_code == 422
    assert bad.headers["x-request-id"] == "lab-7-b"
    assert bad.json()["error"]["request_id"] == "lab-7-b"

    for r in (
        await c.post("/predict", files={"file": ("a.jpeg", b"nope")}, headers={"X-Request-ID": "not sane\t"}),
        await c.get("/no/such/route"),
        await c.post("/predict", content=b"x", headers={"content-type": "text/plain"}),
    ):
        generated = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
        assert r.json()["error"]["request_id"] == generated

    assert "x-request-id" in (await c.get("/health/live")).headers


async def test_server_timing_on_predictions_only(served: Served) -> None:
    c = served.client
    one = await c.post("/predict", files={"file": ("a.jpeg", jpeg(0))})
    many = await c.post("/predict-many", files=[("files", ("a.jpeg", jpeg(1))), ("files", ("b.jpeg", jpeg(2)))])
    for r in (one, many):
        assert r.status_code == 200
        assert SERVER_TIMING.match(r.headers["server-timing"]), r.headers["server-timing"]
    assert "server-timing" not in (await c.get("/health/live")).headers
    assert "server-timing" not in (await c.get("/model")).headers


# --- logs ------------------------------------------------------------------------------------


async def test_one_json_access_line_per_request_and_never_a_file_name(
    logged: tuple[Served, io.StringIO],
) -> None:
    s, log = logged
    c = s.client
    one = await c.post("/predict", files={"file": (f"{SECRET}.jpeg", jpeg(0))}, headers={"X-Request-ID": "r-1"})
    many = await c.post(
        "/predict-many",
        headers={"X-Request-ID": "r-2"},
        files=[
            ("files", (f"{SECRET}_a.jpeg", jpeg(1))),
            ("files", (f"{SECRET}_b.txt", b"no image")),
        ],
    )
    bad = await c.post("/predict", files={"file": (f"{SECRET}.png", b"x")}, headers={"X-Request-ID": "r-3"})
    await c.get("/metrics")
    assert (one.status_code, many.status_code, bad.status_code) == (200, 200, 422)
    assert SECRET in many.text  # the client gets its file names back, the log does not

    text = log.getvalue()
    assert SECRET not in text
    lines = json_lines(log)
    access = {a["request_id"]: a for a in lines if a["logger"] == "lungserve.access"}
    first = access["r-1"]
    assert set(first) == {
        "ts",
        "level",
        "logger",
        "msg",
        "request_id",
        "method",
        "route",
        "status",
        "duration_s",
        "images",
        "batch_ids",
        "batch_sizes",
        "queue_s",
        "decode_s",
        "inference_s",
        "model_version",
    }
    assert {k: first[k] for k in ("level", "msg", "method", "route", "status", "images", "model_version")} == {
        "level": "INFO",
        "msg": "request",
        "method": "POST",
        "route": "/predict",
        "status": 200,
        "images": 1,
        "model_version": MANIFEST.version,
    }
    assert len(first["batch_ids"]) == 1
    assert 1 <= first["batch_sizes"][0] <= 4
    assert first["duration_s"] >= first["inference_s"] > 0
    assert access["r-2"]["images"] == 2
    assert access["r-2"]["status"] == 200
    assert access["r-3"]["status"] == 422
    # Exactly one access line per request; the /metrics scrape is there too, at DEBUG.
    ids = [a["request_id"] for a in lines if a["logger"] == "lungserve.access"]
    assert len(ids) == len(set(ids)) == 4
    [scrape] = [a for a in lines if a["logger"] == "lungserve.access" and a["route"] == "/metrics"]
    assert scrape["level"] == "DEBUG"


async def test_start_up_and_shut_down_are_logged(server_log: io.StringIO) -> None:
    async with serve(make_settings()):
        pass
    lines = json_lines(server_log)
    msgs = [x["msg"] for x in lines]
    [verified] = [x for x in lines if x["msg"].startswith("model fetched and verified")]
    assert verified["sha256"] == MANIFEST.sha256
    assert verified["model_version"] == MANIFEST.version
    assert verified["source"]
    [ready] = [x for x in lines if x["msg"].startswith("ready:")]
    assert ready["provider"] == "CPUExecutionProvider"
    assert ready["max_batch_size"] == 4
    assert any(m.startswith("warm-up done") for m in msgs)
    assert msgs.index(verified["msg"]) < msgs.index(ready["msg"]) < msgs.index("stopped")


async def test_x_request_id_header_on_every_response_even_without_lifespan() -> None:
    # Before start-up the middleware still answers with an id (and the 503 body carries it).
    app = create_app(make_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        r = await client.get("/health/ready", headers={"X-Request-ID": "probe-1"})
    assert r.status_code == 503
    assert r.headers["x-request-id"] == "probe-1"
    assert r.json()["error"]["request_id"] == "probe-1"
