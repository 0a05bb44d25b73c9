"""Issue 10's rows that need a real process and real sockets: shutdown (10, 11), slow bodies
(5), big bodies (9), disconnects and metrics (14), the admin port. Every wait is on an event
(an answer, a metric, the process exit) and bounded."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e import rawhttp
from tests.e2e.rawhttp import Multipart, exchange, request
from tests.e2e.server import EXIT_TIMEOUT_S, Server, free_port, start_server, wait_ready
from tests.images import noise_jpeg

pytestmark = [pytest.mark.e2e]

WAIT_S = 60.0


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            out[name] = float(number)
    return out


def total(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix + "{") or k == prefix)


def until(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    """Poll `condition()` (an event observed through the server's API), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@contextmanager
def started(tmp_path: Path, **env: str) -> Iterator[Server]:
    with start_server(tmp_path, LUNGSERVE_LOG_LEVEL="WARNING", **env) as server:
        asyncio.run(wait_ready(server))
        yield server


# --- rows 10 and 11: shutdown -------------------------------------------------------------------


async def _many(client: httpx.AsyncClient, files: list[bytes]) -> httpx.Response | Exception:
    try:
        return await client.post(
            "/predict-many", files=[("files", (f"{i}.jpeg", d, "image/jpeg")) for i, d in enumerate(files)]
        )
    except httpx.HTTPError as exc:
        return exc


def test_sigterm_answers_every_admitted_request_with_its_result_or_json_503(tmp_path: Path) -> None:
    # Row 10: more admitted work than the drain (0.2 s) can finish; uvicorn must never cancel a
    # request (its bare 500): each gets 200 or our JSON 503 shutting_down.
    env = {
        "LUNGSERVE_DRAIN_TIMEOUT_S": "0.2",
        "LUNGSERVE_SHUTDOWN_DELAY_S": "0",
        "LUNGSERVE_MAX_IN_FLIGHT_BATCHES": "1",
        "LUNGSERVE_MAX_BATCH_SIZE": "4",
    }
    files = [noise_jpeg(512, i, quality=90) for i in range(8)]

    async def scenario(server: Server) -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S, limits=httpx.Limits(max_connections=64)) as c:
            tasks = [asyncio.ensure_future(_many(c, files)) for _ in range(24)]
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:  # the event: images are queued in the batcher
                m = await c.get("/metrics")
                if any(
                    line.startswith("lungserve_queue_depth ") and float(line.split()[-1]) > 0
                    for line in m.text.splitlines()
                ):
                    break
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks))

    with started(tmp_path, **env) as server:
        answers = asyncio.run(scenario(server))
        assert server.proc.wait(EXIT_TIMEOUT_S) == 0, server.output()
    admitted = [a for a in answers if isinstance(a, httpx.Response)]
    refused = [a for a in answers if isinstance(a, httpx.ConnectError)]  # the listener had closed
    assert len(admitted) + len(refused) == len(answers), [a for a in answers if isinstance(a, Exception)]
    for response in admitted:
        assert response.headers["content-type"] == "application/json", response.text
        if response.status_code == 200:
            for result in response.json()["results"]:
                assert "label" in result or result["error"]["code"] == "shutting_down", result
        else:
            assert (response.status_code, response.json()["error"]["code"]) == (503, "shutting_down")


def test_readiness_is_503_before_the_listener_closes_and_requests_are_still_served(tmp_path: Path) -> None:
    # Row 11: after SIGTERM /health/ready says 503 while /predict is still served (for
    # LUNGSERVE_SHUTDOWN_DELAY_S, long here); a second SIGTERM ends the wait; exit status 0.
    with started(tmp_path, LUNGSERVE_SHUTDOWN_DELAY_S="600") as server:
        assert httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 503, "readiness 503")
        ready = httpx.get(f"{server.url}/health/ready", timeout=5)
        predicted = httpx.post(
            f"{server.url}/predict",
            files={"file": ("t.jpeg", noise_jpeg(seed=1, quality=90), "image/jpeg")},
            timeout=30,
        )
        live = httpx.get(f"{server.url}/health/live", timeout=5)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(EXIT_TIMEOUT_S) == 0, server.output()
    assert (ready.status_code, ready.json()["error"]["code"]) == (503, "shutting_down")
    assert predicted.status_code == 200, predicted.text
    assert live.status_code == 200


# --- row 5: slow bodies do not hold queue slots; row 9: big bodies are refused before reading -----


def test_slow_uploads_hold_no_queue_slot(tmp_path: Path) -> None:
    env = {
        "LUNGSERVE_QUEUE_LIMIT": "4",
        "LUNGSERVE_MAX_BATCH_SIZE": "4",
        "LUNGSERVE_MAX_FILES_PER_REQUEST": "4",
        "LUNGSERVE_UPLOAD_RATE_GRACE_S": "60",
    }
    form = Multipart().add("file", noise_jpeg(seed=2, quality=90))
    body = form.body()
    head = request("POST", "/predict", b"", [("Content-Type", form.content_type), ("Content-Length", str(len(body)))])
    with started(tmp_path, **env) as server:
        trickles = [rawhttp.connect(port_of(server)) for _ in range(8)]  # twice the queue limit
        try:
            for sock in trickles:
                sock.sendall(head + body[:50])
            # With admission before the body, these eight would hold all four slots: 503.
            answer = exchange(port_of(server), request("POST", "/predict", body, [("Content-Type", form.content_type)]))
            assert answer.status == 200, answer.body
        finally:
            for sock in trickles:
                sock.close()


def test_a_big_body_is_refused_before_it_is_read_when_the_byte_budget_is_taken(tmp_path: Path) -> None:
    limit = 8 * 1024 * 1024
    env = {
        "LUNGSERVE_MAX_REQUEST_BYTES": str(limit),
        "LUNGSERVE_MAX_FILE_BYTES": str(limit),
        "LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT": str(limit),
        "LUNGSERVE_UPLOAD_RATE_GRACE_S": "60",
    }
    declared = [("Content-Type", "multipart/form-data; boundary=B"), ("Content-Length", str(limit))]
    with started(tmp_path, **env) as server:
        with rawhttp.connect(port_of(server)) as holder:
            holder.sendall(request("POST", "/predict-many", b"", declared) + b"--B\r\n")  # takes the whole budget
            until(lambda: metrics(server.url)["lungserve_body_bytes_in_flight"] >= limit, "the byte budget to be taken")
            # No body at all was sent with this one: the answer can only come before reading.
            answer = exchange(port_of(server), request("POST", "/predict-many", b"", declared))
        after = exchange(port_of(server), request("GET", "/health/ready"))
    assert (answer.status, answer.code) == (503, "overloaded")
    assert "MAX_BODY_BYTES_IN_FLIGHT" in answer.json()["error"]["message"]
    assert answer.headers.get("retry-after")
    assert answer.closed  # Connection: close, the unread body is never waited for
    assert after.status == 200


# --- row 14: every admitted image in exactly one outcome, whatever the clients do ----------------


def test_clients_leaving_mid_queue_are_counted_once(tmp_path: Path) -> None:
    env = {"LUNGSERVE_MAX_BATCH_SIZE": "2", "LUNGSERVE_MAX_IN_FLIGHT_BATCHES": "1", "LUNGSERVE_QUEUE_LIMIT": "256"}
    busy_files = [noise_jpeg(512, i, quality=90) for i in range(8)]
    single = Multipart().add("file", noise_jpeg(seed=99, quality=90))
    leave = request("POST", "/predict", single.body(), [("Content-Type", single.content_type)])

    async def scenario(url: str, port: int) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
            busy = [asyncio.ensure_future(_many(client, busy_files)) for _ in range(6)]
            leavers = 0
            for _ in range(24):
                sock = rawhttp.connect(port)
                sock.sendall(leave)
                sock.close()  # gone before the answer: queued, decoding or computing
                leavers += 1
            answers = await asyncio.gather(*busy)
        assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers)
        return leavers

    with started(tmp_path, **env) as server:
        before = metrics(server.url)
        leavers = asyncio.run(scenario(server.url, port_of(server)))
        expected = leavers + 6 * len(busy_files)

        def counted() -> float:
            m = metrics(server.url)
            images = total(m, "lungserve_images_total") - total(before, "lungserve_images_total")
            refused = total(m, "lungserve_rejected_total") - total(before, "lungserve_rejected_total")
            return images + refused

        until(lambda: counted() >= expected, f"{expected} outcomes")
        m = metrics(server.url)
        assert counted() == expected, m
        assert m["lungserve_queue_depth"] == 0


# --- the admin port ------------------------------------------------------------------------------


def test_admin_and_metrics_only_on_the_admin_port(tmp_path: Path) -> None:
    admin_port = free_port()
    env = {"LUNGSERVE_ADMIN_PORT": str(admin_port), "LUNGSERVE_ADMIN_TOKEN": "s3cret"}
    with started(tmp_path, **env) as server:
        admin = f"http://127.0.0.1:{admin_port}"
        public_metrics = httpx.get(f"{server.url}/metrics", timeout=5)
        public_admin = httpx.post(f"{server.url}/admin/reload", timeout=5)
        admin_metrics = httpx.get(f"{admin}/metrics", timeout=5)
        admin_predict = httpx.post(
            f"{admin}/predict", files={"file": ("t.jpeg", noise_jpeg(seed=3, quality=90), "image/jpeg")}, timeout=5
        )
        admin_ready = httpx.get(f"{admin}/health/ready", timeout=5)
        predicted = httpx.post(
            f"{server.url}/predict",
            files={"file": ("t.jpeg", noise_jpeg(seed=3, quality=90), "image/jpeg")},
            timeout=30,
        )
    assert (public_metrics.status_code, public_metrics.json()["error"]["code"]) == (404, "not_found")
    assert public_admin.status_code == 404
    assert admin_metrics.status_code == 200
    assert "lungserve_requests_total" in admin_metrics.text
    assert admin_predict.status_code == 404
    assert admin_ready.status_code == 200
    assert predicted.status_code == 200


# --- row 6: a bounded number of connections ------------------------------------------------------


def test_connections_beyond_the_limit_get_json_503_and_are_closed(tmp_path: Path) -> None:
    env = {"LUNGSERVE_MAX_CONNECTIONS": "4", "LUNGSERVE_HEADER_TIMEOUT_S": "600"}
    with started(tmp_path, **env) as server:
        idle = [rawhttp.connect(port_of(server)) for _ in range(4)]  # connected, nothing sent
        try:
            with rawhttp.connect(port_of(server)) as extra:
                refused = rawhttp.read_response(extra)
        finally:
            for sock in idle:
                sock.close()
        until(lambda: exchange(port_of(server), request("GET", "/health/live")).status == 200, "a free connection")
    assert (refused.status, refused.code, refused.closed) == (503, "overloaded", True)
