"""`lungserve serve` as a real uvicorn process under concurrent load: /metrics moves by exactly
the requests and images sent, and its JSON log lines never hold an uploaded file name."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LC25000
from tests.e2e.server import EXIT_TIMEOUT_S, start_server, wait_ready
from tests.images import noise_jpeg

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

N = 24
MAX_BATCH = 8
# Distinctive, patient-like file names: grep the server's output for them afterwards.
SECRET = "patient_jane_doe_19620412"


def upload_images() -> list[bytes]:
    """Real LC25000 tiles when the data is beside the project, else noise JPEGs: the counts
    under test do not depend on what the images show, so this test always runs."""
    real = sorted(p for c in ("lung_aca", "lung_n", "lung_scc") for p in (LC25000 / c).glob("*.jpeg"))
    if len(real) >= N:
        return [p.read_bytes() for p in real[:: max(1, len(real) // N)][:N]]
    return [noise_jpeg(128, seed) for seed in range(N)]


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_are_exact_under_concurrent_load_and_logs_hold_no_file_names(tmp_path: Path) -> None:
    datas = upload_images()
    env = {
        "LUNGSERVE_MAX_BATCH_SIZE": str(MAX_BATCH),
        "LUNGSERVE_MAX_BATCH_DELAY_S": "0.01",
        "LUNGSERVE_LOG_JSON": "true",
        "LUNGSERVE_LOG_LEVEL": "INFO",
    }
    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        limits = httpx.Limits(max_connections=N)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as client:
            before = scrape((await client.get("/metrics")).text)
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/predict",
                        files={"file": (f"{SECRET}_{i:03d}.jpeg", data, "image/jpeg")},
                        headers={"X-Request-ID": f"e2e-{i}"},
                    )
                    for i, data in enumerate(datas)
                )
            )
            after = scrape((await client.get("/metrics")).text)

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(EXIT_TIMEOUT_S) == 0, server.output()

    assert [r.status_code for r in responses] == [200] * N, [r.text for r in responses if r.status_code != 200]
    assert [r.headers["x-request-id"] for r in responses] == [f"e2e-{i}" for i in range(N)]
    assert all(r.headers["server-timing"].startswith("queue;dur=") for r in responses)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("lungserve_requests_total", route="/predict", status="2xx") == N
    assert delta("lungserve_request_duration_seconds_count", route="/predict") == N
    assert delta("lungserve_images_total", outcome="ok") == N
    for outcome in ("invalid", "too_large", "rejected", "cancelled", "error"):
        assert delta("lungserve_images_total", outcome=outcome) == 0
    assert delta("lungserve_batch_size_sum") == N  # every image in exactly one batch
    batches = delta("lungserve_batch_size_count")
    assert -(-N // MAX_BATCH) <= batches <= N
    assert delta("lungserve_inference_seconds_count") == batches
    assert delta("lungserve_queue_wait_seconds_count") == N
    assert delta("lungserve_decode_seconds_count") == N
    labels = Counter(r.json()["label"] for r in responses)
    for label, n in labels.items():
        assert delta("lungserve_predictions_total", label=label) == n
    assert value(after, "lungserve_queue_depth") == 0
    assert value(after, "lungserve_batches_in_flight") == 0
    assert value(after, "lungserve_model_ready") == 1

    output = server.output()
    assert SECRET not in output
    lines: list[dict[str, Any]] = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    access = [x for x in lines if x["logger"] == "lungserve.access" and x["route"] == "/predict"]
    assert sorted(x["request_id"] for x in access) == sorted(f"e2e-{i}" for i in range(N))
    assert all(x["status"] == 200 and x["images"] == 1 and len(x["batch_ids"]) == 1 for x in access)
    # The batch sizes the access lines report agree with the batches /metrics counted.
    sizes = {x["batch_ids"][0]: x["batch_sizes"][0] for x in access}
    assert sum(sizes.values()) == N
    assert len(sizes) == batches
    msgs = [x["msg"] for x in lines]
    assert any(m.startswith("model fetched and verified") for m in msgs)
    assert any(m.startswith("ready:") for m in msgs)
    assert "stopped" in msgs
