"""Slide jobs with several fronts (docs/topology.md): front 0 runs them, every front answers /jobs.

A supervisor with two fronts, real processes. Each /jobs request goes over a new connection
(the kernel spreads them over the fronts) with its own request id, and the shared metrics say
which front took it: `lungserve_jobs_forwarded_total` moves when another front passed it to
front 0. Requests are repeated until every kind has been answered both ways, and every answer
must be the one a single process gives. Synchronised on the job state, the metrics and the
process table, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.pathology.jobs import Job, new_job_id
from tests.e2e import rawhttp
from tests.e2e.server import EXIT_TIMEOUT_S, Server, start_server, wait_ready
from tests.e2e.test_topology import TIMEOUT_S, TOPOLOGY, children, until
from tests.images import noise
from tests.slides import CELL, write_slide

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab"}
SMALL_TILES = 6  # 3 x 2 cells, 2 of them tissue
LONG_SIDE = 24_576  # 1,024 glass tiles: a job that runs far longer than a test needs it to
KINDS = ("submit", "status", "list", "result", "delete")


@dataclass
class JobsClient:
    """Every request on a new connection, with its own X-Request-ID; records which way it went."""

    url: str
    sent: list[str] = field(default_factory=list)  # request ids of every /jobs request
    refused: set[str] = field(default_factory=set)  # those a front answered 503 jobs_unavailable
    seen: set[tuple[str, bool]] = field(default_factory=set)  # (kind, forwarded by another front)

    async def call(self, kind: str, method: str, path: str, key: str = "alice", **kw: Any) -> httpx.Response:
        request_id = f"{kind}-{len(self.sent)}"
        headers = {"Authorization": f"Bearer {KEYS[key]}", "X-Request-ID": request_id}
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as client:
            before = await forwarded(client)
            response = await client.request(method, path, headers=headers, **kw)
            after = await forwarded(client)
        self.sent.append(request_id)
        assert response.headers["x-request-id"] == request_id, response.headers
        if response.status_code == 503 and response.json()["error"]["code"] == "jobs_unavailable":
            self.refused.add(request_id)
        else:
            assert after["answered"] - before["answered"] in (0, 1)
            self.seen.add((kind, after["answered"] > before["answered"]))
        return response

    def call_raw(self, sock: socket.socket, path: str, key: str = "alice") -> rawhttp.RawResponse:
        """GET `path` on a connection of the caller's choice (`rawhttp.connect_via`)."""
        request_id = f"raw-{len(self.sent)}"
        headers = [("Authorization", f"Bearer {KEYS[key]}"), ("X-Request-ID", request_id)]
        rawhttp.send_all(sock, rawhttp.request("GET", path, headers=headers))
        response = rawhttp.read_response(sock)
        self.sent.append(request_id)
        assert response.headers["x-request-id"] == request_id, response.headers
        if response.status == 503 and response.code == "jobs_unavailable":
            self.refused.add(request_id)
        return response

    def answered_both_ways(self, *kinds: str) -> bool:
        return all((kind, way) in self.seen for kind in kinds for way in (False, True))

    async def submit(self, slide: Path, key: str = "alice") -> dict[str, Any]:
        with slide.open("rb") as fh:
            response = await self.call("submit", "POST", "/jobs", key, files={"file": (slide.name, fh, "image/tiff")})
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        assert body["status_url"] == f"{self.url}/jobs/{body['id']}"  # the client's address, not front 0's socket
        assert response.headers["location"] == body["status_url"]
        return body

    async def state(self, job_id: str) -> dict[str, Any]:
        response = await self.call("status", "GET", f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait(self, job_id: str, *states: str) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S * 5):  # a bound, not a timing: the job's state is the event
            while True:
                status = await self.state(job_id)
                if status["state"] in states:
                    return status
                await asyncio.sleep(0.05)


async def forwarded(client: httpx.AsyncClient) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for s in await _samples(client, "lungserve_jobs_forwarded_total")
        if s.name == "lungserve_jobs_forwarded_total"
    }


async def _samples(client: httpx.AsyncClient, name: str) -> list[Sample]:
    text = (await client.get("/metrics")).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith(name)]


async def jobs_gauge(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        samples = [s for s in await _samples(client, "lungserve_jobs") if s.name == "lungserve_jobs"]
    assert all(set(s.labels) == {"state"} for s in samples), samples  # no per-process (pid) series
    return {s.labels["state"]: s.value for s in samples}


async def metric(url: str, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        samples = await _samples(client, name)
    return sum(
        float(s.value) for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@dataclass
class Topology:
    server: Server
    jobs: JobsClient
    small: Path
    long: Path
    seeded: str | None  # a queued job found in the store at start


@contextmanager
def topology(tmp_path: Path, inference: str, seeded: bool = False) -> Iterator[Topology]:
    """The test's objects: two slides, a keys file, maybe a queued job already in the store, and
    a supervisor with two fronts (one slide job at a time)."""
    small = write_slide(
        tmp_path / "small.tif",
        3 * CELL,
        2 * CELL,
        {(0, 0): np.asarray(noise(CELL, seed=1)), (2, 1): np.asarray(noise(CELL, seed=2))},
    )
    long = write_slide(tmp_path / "long.tif", LONG_SIDE, LONG_SIDE, {})
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    # As a server stopped with a job queued leaves it (the servers use tmp_path / "jobs").
    queued = _seed(tmp_path / "jobs", small) if seeded else None
    env = {
        **TOPOLOGY,
        "LUNGSERVE_INFERENCE": inference,
        "LUNGSERVE_PROVIDER": "cpu",
        "LUNGSERVE_API_KEYS_FILE": str(keys),
        "LUNGSERVE_JOBS_CONCURRENCY": "1",
        "LUNGSERVE_SHUTDOWN_DELAY_S": "0",
    }
    with start_server(tmp_path, **env) as server:
        yield Topology(server, JobsClient(server.url), small, long, queued)


def _seed(store: Path, slide: Path) -> str:
    """A queued job in the store's layout (service.jobs.store): its record and its slide."""
    job = Job(id=new_job_id(), owner="alice", source="upload")
    (store / job.id).mkdir(parents=True)
    shutil.copy(slide, store / job.id / "source")
    (store / job.id / "job.json").write_text(json.dumps(job.to_record()))
    return job.id


async def _started(t: Topology) -> None:
    """Both fronts serve /jobs: an answer straight from front 0 and one passed on by front 1
    (until then front 1 answers 503 jobs_unavailable: front 0 is still starting)."""
    await wait_ready(t.server)

    async def both() -> bool:
        await t.jobs.call("list", "GET", "/jobs")
        return t.jobs.answered_both_ways("list")

    await until(both, "both fronts answering /jobs")


@pytest.mark.parametrize("inference", ["model-process", "in-front"])
async def test_every_front_answers_every_jobs_route_and_a_job_runs_once(tmp_path: Path, inference: str) -> None:
    with topology(tmp_path, inference) as t:
        await _started(t)
        jobs, url = t.jobs, t.server.url
        job = await t.jobs.submit(t.small)
        done = await jobs.wait(job["id"], "done", "failed", "cancelled")
        assert done["state"] == "done", done
        assert done["progress"] == {"tiles_done": SMALL_TILES, "tiles_total": SMALL_TILES}
        # Run once, by one process: every tile counted once, one job finished.
        assert await metric(url, "lungserve_job_tiles_total") == SMALL_TILES
        assert await metric(url, "lungserve_job_duration_seconds_count", state="done") == 1
        # The jobs gauge is front 0's count, one series per state, never one per process.
        assert await jobs_gauge(url) == {"queued": 0, "running": 0, "done": 1, "failed": 0, "cancelled": 0}

        result = await jobs.call("result", "GET", f"/jobs/{job['id']}/result")
        assert result.status_code == 200, result.text
        assert len(result.json()["tiles"]) == 2
        # Something to cancel: the long job runs (one at a time), the next ones wait queued.
        running = await jobs.submit(t.long)
        await jobs.wait(running["id"], "running")
        cancelled = 0
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not jobs.answered_both_ways(*KINDS):
            assert asyncio.get_running_loop().time() < deadline, f"not every kind from both fronts: {jobs.seen}"
            status = await jobs.state(job["id"])
            assert status == done
            theirs = await jobs.call("status", "GET", f"/jobs/{job['id']}", key="bob")
            assert theirs.status_code == 404, theirs.text  # another key's job: not found, on every front
            assert theirs.json()["error"] == {
                "code": "not_found",
                "message": "no such job",
                "request_id": theirs.headers["x-request-id"],
            }
            listed = await jobs.call("list", "GET", "/jobs")
            assert listed.status_code == 200, listed.text
            assert [j["id"] for j in listed.json()["jobs"]][-1] == job["id"]
            assert (await jobs.call("list", "GET", "/jobs", key="bob")).json() == {"jobs": []}
            again = await jobs.call("result", "GET", f"/jobs/{job['id']}/result")
            assert again.status_code == 200
            assert again.content == result.content
            queued = await jobs.submit(t.long)  # waits behind the running one
            answer = await jobs.call("delete", "DELETE", f"/jobs/{queued['id']}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["state"] == "cancelled"  # the answer shows it cancelled
            cancelled += 1
            twice = await jobs.call("delete", "DELETE", f"/jobs/{queued['id']}")
            assert twice.status_code == 409
            assert twice.json()["error"]["code"] == "job_conflict"
        answer = await jobs.call("delete", "DELETE", f"/jobs/{running['id']}")
        assert answer.status_code == 200
        assert answer.json()["state"] == "cancelled"
        assert await metric(url, "lungserve_job_duration_seconds_count", state="cancelled") == cancelled + 1
        assert await metric(url, "lungserve_job_duration_seconds_count", state="done") == 1
        want = {"queued": 0, "running": 0, "done": 1, "failed": 0, "cancelled": cancelled + 1}
        assert await jobs_gauge(url) == want
        # Counted once: by front 0, whichever front the client reached.
        # A request is counted once its answer is sent, so the last one may still be on its way.
        await until(lambda: _counted_at_least(url, len(jobs.sent)), "every /jobs request counted")
        assert await _jobs_requests(url) == len(jobs.sent)
        t.server.proc.send_signal(signal.SIGTERM)
        assert t.server.proc.wait(EXIT_TIMEOUT_S) == 0
        # One access line per request, front 0's (with the key's name), under the client's id.
        lines = _access_lines(t.server.output())
        for request_id in jobs.sent:
            [line] = lines[request_id]
            assert line["route"].startswith("/jobs"), line
            assert (line.get("api_key") in KEYS) == (request_id not in jobs.refused), line


async def _counted_at_least(url: str, n: int) -> bool:
    return await _jobs_requests(url) >= n


async def _jobs_requests(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        samples = await _samples(client, "lungserve_requests_total")
    return sum(
        float(s.value)
        for s in samples
        if s.name == "lungserve_requests_total" and s.labels["route"].startswith("/jobs")
    )


def _access_lines(log: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for raw in log.splitlines():
        if not raw.startswith("{"):
            continue
        line = json.loads(raw)
        if line.get("logger") == "lungserve.access" and line.get("level") == "INFO":
            found.setdefault(line["request_id"], []).append(line)
    return found


async def test_a_queued_job_runs_once_and_front_0_killed_is_a_503_then_replaced(tmp_path: Path) -> None:
    with topology(tmp_path, "model-process", seeded=True) as t:
        await _started(t)
        jobs, url = t.jobs, t.server.url
        assert t.seeded is not None
        done = await jobs.wait(t.seeded, "done", "failed", "cancelled")
        assert done["state"] == "done", done
        # Both fronts read the store at start; one ran the job.
        assert await metric(url, "lungserve_job_tiles_total") == SMALL_TILES
        assert await metric(url, "lungserve_job_duration_seconds_count", state="done") == 1

        running = await jobs.submit(t.long)
        await jobs.wait(running["id"], "running")
        front = children(t.server)["lungserve: front 0"]
        # Each front has its own socket: what front 1 answers while front 0 is down is asked on a
        # connection front 1 accepted (new connections hashed to front 0's wait for its replacement).
        port = int(url.rsplit(":", 1)[1])
        via_front_1 = await asyncio.to_thread(rawhttp.connect_via, children(t.server)["lungserve: front 1"], port)
        os.kill(front, signal.SIGKILL)
        await until(lambda: _async(children(t.server).get("lungserve: front 0") != front), "front 0 gone")
        with via_front_1:
            refused_raw = await asyncio.to_thread(jobs.call_raw, via_front_1, f"/jobs/{running['id']}")
        assert refused_raw.status == 503, refused_raw.body[:300]
        assert refused_raw.code == "jobs_unavailable"
        assert refused_raw.headers["retry-after"] == "1"
        assert refused_raw.json()["error"]["request_id"] == refused_raw.headers["x-request-id"]
        answers: list[httpx.Response] = []

        async def answered_by_the_new_front_0() -> bool:
            answers.append(response := await jobs.call("status", "GET", f"/jobs/{running['id']}"))
            return response.status_code == 200

        await until(answered_by_the_new_front_0, "the job answered again, by the replacement front 0")
        refused = [a for a in answers if a.status_code != 200]
        for answer in refused:  # a clear 503, never a 500 or a hang
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["code"] == "jobs_unavailable"
            assert answer.json()["error"]["request_id"] == answer.headers["x-request-id"]
        # The replacement recovered it from the store: running when killed, queued again, resumed.
        assert answers[-1].json()["state"] in ("queued", "running")
        assert children(t.server)["lungserve: front 0"] != front
        cancel = await jobs.call("delete", "DELETE", f"/jobs/{running['id']}")
        assert cancel.status_code == 200
        assert cancel.json()["state"] == "cancelled"
        assert await metric(url, "lungserve_jobs_forwarded_total", outcome="unavailable") == len(jobs.refused)
        t.server.proc.send_signal(signal.SIGTERM)
        assert t.server.proc.wait(EXIT_TIMEOUT_S) == 0


async def _async(value: bool) -> bool:
    return value
