"""Admission through the app: the header-time shed rule, readiness while draining, and the body
gates reported in /metrics (issue 10)."""

from __future__ import annotations

import pytest

from tests.app.conftest import Served

pytestmark = pytest.mark.anyio


async def test_shed_at_headers_only_for_posts_to_doors_when_the_queue_is_full(served: Served) -> None:
    shed = served.app.state.shed_at_headers
    runtime = served.state.current()
    assert not shed(b"POST", b"/predict")  # room in the queue: the app answers
    held = runtime.reserve(runtime.free_slots)
    try:
        assert shed(b"POST", b"/predict")
        assert shed(b"POST", b"/v2/models/lungserve-lung-cnn/infer")
        assert not shed(b"GET", b"/health/ready")
        assert not shed(b"POST", b"/admin/reload")
    finally:
        held.release()
    metrics = (await served.client.get("/metrics")).text
    assert 'lungserve_rejected_total{reason="queue_full"} 2.0' in metrics


async def test_draining_turns_readiness_503_while_requests_are_served(served: Served) -> None:
    served.app.state.shutdown.draining()
    ready = await served.client.get("/health/ready")
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "shutting_down")
    model = await served.client.get("/model")
    assert model.status_code == 200
    assert not served.app.state.shed_at_headers(b"POST", b"/predict")


async def test_upload_gauges_are_exposed(served: Served) -> None:
    metrics = (await served.client.get("/metrics")).text
    assert "lungserve_uploads_in_flight 0.0" in metrics
    assert "lungserve_body_bytes_in_flight 0.0" in metrics
