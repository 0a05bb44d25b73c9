"""Optional API keys (401 JSON, key names in logs and metrics, open health/metrics/docs) and CORS."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import Served, make_settings, serve
from tests.images import noise_jpeg

pytestmark = pytest.mark.anyio

VIEWER_KEY = "viewer-key-0123456789abcdef"
PIPELINE_KEY = "pipeline-key-fedcba9876543210"
ORIGIN = "https://viewer.lab.example"


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[Served]:
    keys = tmp_path / "keys"
    keys.write_text(f"# test keys\nviewer:{VIEWER_KEY}\npipeline:{PIPELINE_KEY}\n")
    async with serve(make_settings(api_keys_file=keys, cors_origins=[ORIGIN])) as s:
        yield s


def key_counts(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["key"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "lungserve_api_key_requests"
        for s in family.samples
        if s.name == "lungserve_api_key_requests_total"
    }


async def test_api_keys_guard_prediction_routes_only(keyed: Served, server_log: io.StringIO) -> None:
    client = keyed.client
    image = {"file": ("t.jpeg", noise_jpeg(), "image/jpeg")}

    missing = await client.post("/predict", files=image)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = await client.post("/predict", files=image, headers={"Authorization": f"Bearer {VIEWER_KEY}x"})
    assert wrong.status_code == 401
    assert (await client.get("/model")).status_code == 401
    oip = await client.get("/v2/models/lungserve-lung-cnn")
    assert oip.status_code == 401
    assert set(oip.json()) == {"error"}
    assert isinstance(oip.json()["error"], str)  # the protocol's error shape

    bearer = await client.post("/predict", files=image, headers={"Authorization": f"Bearer {VIEWER_KEY}"})
    assert bearer.status_code == 200, bearer.text
    header = await client.post("/predict", files=image, headers={"X-API-Key": PIPELINE_KEY})
    assert header.status_code == 200, header.text

    for open_path in ("/health/live", "/health/ready", "/metrics", "/v2/health/ready", "/docs", "/openapi.json"):
        assert (await client.get(open_path)).status_code == 200, open_path
    # The admin API keeps its own token: an API key neither opens nor is needed for it.
    admin = await client.post("/admin/reload", headers={"Authorization": f"Bearer {VIEWER_KEY}"})
    assert admin.status_code == 404  # no admin token configured

    metrics = (await client.get("/metrics")).text
    counts = key_counts(metrics)
    assert counts[("viewer", "ok")] == 1
    assert counts[("pipeline", "ok")] == 1
    assert counts[("none", "missing")] == 3  # /predict, /model, /v2/models/{name}
    assert counts[("none", "invalid")] == 1
    # The 401s count under their own route, not as unmatched.
    assert 'lungserve_requests_total{route="/predict",status="4xx"} 2.0' in metrics

    logged = [json.loads(line) for line in server_log.getvalue().splitlines()]
    assert {r.get("api_key") for r in logged if r.get("route") == "/predict" and r.get("status") == 200} == {
        "viewer",
        "pipeline",
    }
    everything = server_log.getvalue() + metrics
    assert VIEWER_KEY not in everything
    assert PIPELINE_KEY not in everything


async def test_openapi_declares_the_api_key_schemes_when_keys_are_on(keyed: Served) -> None:
    schema = (await keyed.client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    predict = schema["paths"]["/predict"]["post"]["security"]
    assert {name for requirement in predict for name in requirement} == {"apiKey", "apiKeyHeader"}
    assert schemes["apiKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": schemes["apiKeyHeader"]["description"],
    }
    assert "security" not in schema["paths"]["/health/ready"]["get"]


async def test_cors_preflight_and_exposed_headers(keyed: Served) -> None:
    client = keyed.client
    preflight = await client.options(
        "/predict",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-request-id",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

    answer = await client.post(
        "/predict",
        files={"file": ("t.jpeg", noise_jpeg(), "image/jpeg")},
        headers={"Origin": ORIGIN, "X-API-Key": VIEWER_KEY},
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()

    # A 401 still carries CORS headers, so the page can show why.
    refused = await client.post("/predict", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN

    other = await client.options(
        "/predict", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    )
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


async def test_no_cors_without_origins(served: Served) -> None:
    response = await served.client.get("/health/live", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers
