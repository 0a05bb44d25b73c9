"""Request ids, JSON log lines, Server-Timing and the access-log middleware on a tiny app."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service.http.middleware import RequestContextMiddleware
from service.observability.logs import (
    JsonFormatter,
    RequestTiming,
    TextFormatter,
    accept_request_id,
    configure_logging,
    current_request,
    current_request_id,
    request_context_from_scope,
    server_timing,
)
from service.observability.metrics import Metrics
from tests.conftest import ROOT

SECRET_NAME = "patient_jane_doe_19620412.jpeg"


# --- request ids -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "good",
    [
        "abc",
        "0f" * 16,
        "a" * 128,
        "Root=1-5759e988-bd862e3fe1be46a994272793",
        "req:42/retry@edge",
        "550e8400-e29b-41d4-a716-446655440000",
    ],
)
def test_sane_client_ids_are_kept(good: str) -> None:
    assert accept_request_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        "a" * 129,
        "has space",
        "line\nbreak",
        'quote"d',
        "tab\t",
        "ünïcode",
        "<script>",
        "semi;colon",
        "comma,separated",
    ],
)
def test_bad_client_ids_are_replaced(bad: str | None) -> None:
    new = accept_request_id(bad)
    assert new != bad
    assert len(new) == 32
    int(new, 16)  # uuid4().hex


def test_generated_ids_differ() -> None:
    assert accept_request_id(None) != accept_request_id(None)


# --- Server-Timing ---------------------------------------------------------------------


def test_server_timing_from_the_record() -> None:
    t = RequestTiming()
    t.add_decode(0.0034)
    t.add_batch(7, 4, queue_wait_s=0.0012, inference_s=0.0021)
    assert server_timing(t) == "queue;dur=1.200, decode;dur=3.400, infer;dur=2.100"


def test_server_timing_sums_decode_and_distinct_batches_and_takes_the_longest_wait() -> None:
    t = RequestTiming()
    for _ in range(3):
        t.add_decode(0.001)
    t.add_batch(1, 2, queue_wait_s=0.004, inference_s=0.010)
    t.add_batch(1, 2, queue_wait_s=0.005, inference_s=0.010)  # same batch: inference once
    t.add_batch(2, 1, queue_wait_s=0.002, inference_s=0.003)
    assert t.batches == {1: 2, 2: 1}
    assert server_timing(t) == "queue;dur=5.000, decode;dur=3.000, infer;dur=13.000"


# --- formatters --------------------------------------------------------------------------


def _record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("lungserve.test")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, args, None, extra=extra)


def test_json_formatter_emits_one_object_with_extras() -> None:
    line = JsonFormatter().format(
        _record("warm-up took %.1f ms", 12.34, provider="CPUExecutionProvider", batch_sizes=[1, 2])
    )
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "INFO"
    assert obj["logger"] == "lungserve.test"
    assert obj["msg"] == "warm-up took 12.3 ms"
    assert obj["provider"] == "CPUExecutionProvider"
    assert obj["batch_sizes"] == [1, 2]
    assert obj["ts"].endswith("+00:00")
    assert "request_id" not in obj  # not inside a request


def test_json_formatter_survives_odd_extras_and_exceptions() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info(), extra={"obj": object()}
        )
    obj = json.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in obj["exc"]
    assert obj["obj"].startswith("<object object")


def test_text_formatter_appends_extras() -> None:
    line = TextFormatter().format(_record("ready", version="3"))
    assert line.endswith("lungserve.test: ready version=3")


def test_configure_logging_installs_one_json_handler_and_silences_uvicorn_access() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access")
    saved_access = access.disabled
    try:
        configure_logging("debug", json=True)
        ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
        assert len(ours) == 1
        assert root.level == logging.DEBUG
        assert access.disabled
        configure_logging("INFO", json=False)
        assert [type(h.formatter) for h in root.handlers] == [TextFormatter]
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        access.disabled = saved_access


# --- the middleware on a tiny app --------------------------------------------------------


async def predict(request: Request) -> Response:
    ctx = current_request()
    assert ctx is not None
    assert request_context_from_scope(request.scope) is ctx
    async with request.form() as form:
        upload = form["file"]
        assert not isinstance(upload, str)
        await upload.read()
    logging.getLogger("lungserve.api").info("classified", extra={"images": 1})
    ctx.images = 1
    ctx.model_version = "3"
    ctx.timing.add_decode(0.002)
    ctx.timing.add_batch(11, 4, queue_wait_s=0.001, inference_s=0.003)
    return JSONResponse({"label": "lung_n"})


async def item(request: Request) -> Response:
    return PlainTextResponse(current_request_id() or "")


async def fail(request: Request) -> Response:
    raise RuntimeError("bug")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(registry: CollectorRegistry) -> httpx.AsyncClient:
    metrics = Metrics(registry, max_batch_size=8)
    app = Starlette(
        routes=[
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/items/{name}", item),
            Route("/fail", fail),
            Route("/metrics", item),
        ],
        middleware=[Middleware(RequestContextMiddleware, metrics=metrics)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def requests(registry: CollectorRegistry, route: str, status: str) -> float | None:
    return registry.get_sample_value("lungserve_requests_total", {"route": route, "status": status})


def _access(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [obj for obj in lines if obj["logger"] == "lungserve.access"]


@pytest.mark.anyio
async def test_prediction_request_gets_id_timing_metrics_and_one_access_line(
    client: httpx.AsyncClient, registry: CollectorRegistry, server_log: io.StringIO
) -> None:
    async with client:
        r = await client.post(
            "/v1/predict",
            files={"file": (SECRET_NAME, b"\xff\xd8 not really", "image/jpeg")},
            headers={"X-Request-ID": "client-42"},
        )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-42"
    assert r.headers["server-timing"] == "queue;dur=1.000, decode;dur=2.000, infer;dur=3.000"
    assert requests(registry, "/v1/predict", "2xx") == 1
    name = "lungserve_request_duration_seconds_count"
    assert registry.get_sample_value(name, {"route": "/v1/predict"}) == 1

    text = server_log.getvalue()
    assert SECRET_NAME not in text
    assert "patient" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    # The handler's own line carries the request id without being told.
    own = {"logger": "lungserve.api", "msg": "classified", "request_id": "client-42"}
    assert own.items() <= lines[0].items()
    [access] = _access(server_log)
    assert access == access | {
        "level": "INFO",
        "msg": "request",
        "request_id": "client-42",
        "method": "POST",
        "route": "/v1/predict",
        "status": 200,
        "images": 1,
        "batch_ids": [11],
        "batch_sizes": [4],
        "model_version": "3",
        "queue_s": 0.001,
        "decode_s": 0.002,
        "inference_s": 0.003,
    }
    assert access["duration_s"] >= 0


@pytest.mark.anyio
async def test_route_is_the_template_and_ids_are_generated_or_replaced(
    client: httpx.AsyncClient, registry: CollectorRegistry, server_log: io.StringIO
) -> None:
    async with client:
        generated = await client.get(f"/items/{SECRET_NAME}")
        replaced = await client.get("/items/x", headers={"X-Request-ID": "bad id with spaces"})
        missing = await client.get(f"/nothing/{SECRET_NAME}")
    for r in (generated, replaced):
        assert r.status_code == 200
        # The id the handler saw is the one echoed.
        assert r.headers["x-request-id"] == r.text
        assert len(r.text) == 32
        assert "server-timing" not in r.headers  # nothing recorded: no header
    assert replaced.text != "bad id with spaces"
    assert missing.status_code == 404
    assert len(missing.headers["x-request-id"]) == 32

    assert requests(registry, "/items/{name}", "2xx") == 2
    assert requests(registry, "unmatched", "4xx") == 1
    assert SECRET_NAME not in server_log.getvalue()
    assert [(a["route"], a["status"]) for a in _access(server_log)] == [
        ("/items/{name}", 200),
        ("/items/{name}", 200),
        ("unmatched", 404),
    ]


@pytest.mark.anyio
async def test_unhandled_error_is_counted_as_5xx_and_logged(
    client: httpx.AsyncClient, registry: CollectorRegistry, server_log: io.StringIO
) -> None:
    async with client:
        r = await client.get("/fail")
    assert r.status_code == 500
    assert requests(registry, "/fail", "5xx") == 1
    [access] = _access(server_log)
    assert access["status"] == 500


@pytest.mark.anyio
async def test_metrics_scrapes_are_counted_but_logged_at_debug(
    client: httpx.AsyncClient, registry: CollectorRegistry, server_log: io.StringIO
) -> None:
    async with client:
        await client.get("/metrics")
    assert requests(registry, "/metrics", "2xx") == 1
    [access] = _access(server_log)
    assert access["level"] == "DEBUG"


def test_no_request_outside_a_request() -> None:
    assert current_request() is None
    assert current_request_id() is None


# A process of its own: logging's handlers, the warnings hook and libtiff's handlers are global.
_DAMAGED_TIFF_SCRIPT = """
import io, sys, warnings
import numpy as np
from PIL import Image
from service.observability.logs import configure_logging
from service.observability.native_logs import silence_pillow_libtiff

configure_logging("INFO", json=True)
print("quieted", silence_pillow_libtiff())
pixels = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8")
buf = io.BytesIO()
Image.fromarray(pixels).save(buf, "TIFF", compression="tiff_adobe_deflate")  # zlib strips, through libtiff
data = bytearray(buf.getvalue())
data[1000:1400] = bytes(b ^ 0x55 for b in data[1000:1400])  # inside the first strip's zlib stream
try:
    Image.open(io.BytesIO(bytes(data))).load()
except OSError as exc:
    print("refused", exc)
warnings.warn("a library's warning")
"""


def test_damaged_tiffs_and_warnings_keep_a_json_log_json() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _DAMAGED_TIFF_SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "quieted 1" in out.stdout  # Pillow's wheel bundles one libtiff
    assert "refused" in out.stdout  # the damage is still an error: Pillow raises, the client gets a 422
    records = [json.loads(line) for line in out.stderr.splitlines()]  # every stderr line is JSON
    warned = [r for r in records if r["logger"] == "py.warnings"]
    assert len(warned) == 1
    assert "a library's warning" in warned[0]["msg"]
    assert warned[0]["level"] == "WARNING"
