"""`lungserve serve` with several processes (docs/topology.md): a supervisor, fronts sharing the
port, one model process. Real processes, real ONNX Runtime; synchronised on readiness and on the
process table, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil  # type: ignore[import-untyped]  # no stubs
import pytest
import tritonclient.grpc as grpcclient

from service.core.queue_bound import MAX_FRONTS
from service.model.manifest import Manifest
from tests.conftest import BUNDLED_MODEL
from tests.e2e import rawhttp
from tests.e2e.server import Server, free_port, start_server, wait_ready
from tests.images import noise_jpeg
from tests.onnx_models import write_model_v2_dir

pytestmark = pytest.mark.anyio

TOPOLOGY = {"LUNGSERVE_WORKERS": "2", "LUNGSERVE_INFERENCE": "model-process", "LUNGSERVE_LOG_JSON": "true"}
TIMEOUT_S = 60.0
MODEL_NAME = Manifest.read(BUNDLED_MODEL / "model.json").name
ATTEMPTS = 5
Cells = np.memmap[Any, np.dtype[np.int64]]


HEAVY = ("onnxruntime_pybind11_state", "_multiarray_umath", "_pydantic_core")


def _native_modules(pid: int) -> set[str]:
    """Which of the app's big native modules (ONNX Runtime, numpy, pydantic) the process maps."""
    names = {Path(m.path).name for m in psutil.Process(pid).memory_maps()}
    return {h for h in HEAVY if any(n.startswith(h) for n in names)}


def _exit_status(server: Server) -> int:
    """The server's exit status; if it has not exited within TIMEOUT_S, fail with its log and
    where each remaining child is stuck."""
    try:
        return server.proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stacks = {title: _stack(pid) for title, pid in children(server).items()}
        pytest.fail(f"no exit {TIMEOUT_S} s after SIGTERM; children {stacks}\n{server.output()}")


def _stack(pid: int) -> str:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "(no py-spy)"
    done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def children(server: Server) -> dict[str, int]:
    """Title -> pid of the supervisor's children (setproctitle)."""
    found = {}
    for child in psutil.Process(server.proc.pid).children():
        try:
            argv = child.cmdline()  # the title, padded with empty arguments; [] once it has exited
        except psutil.NoSuchProcess:
            continue
        if argv:
            found[argv[0]] = child.pid
    return found


async def until(predicate: object, what: str) -> None:
    """Poll a condition on the process table or an endpoint, with a bound."""
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {TIMEOUT_S} s: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("inference", ["model-process", "in-front"])
async def test_processes_have_their_titles_and_every_route_answers(tmp_path: Path, inference: str) -> None:
    grpc_port = free_port()
    env = {**TOPOLOGY, "LUNGSERVE_INFERENCE": inference, "LUNGSERVE_GRPC_PORT": str(grpc_port)}
    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        fronts = {"lungserve: front 0", "lungserve: front 1"}
        # wait_ready saw one front ready; the other may still be starting (importing, or loading
        # its model): lungserve_model_ready is the minimum over every live process.
        await until(lambda: _all_ready(server), "every process ready")
        await until(lambda: _async(fronts <= set(children(server))), "both fronts titled")
        titles = set(children(server))
        assert ("lungserve: model" in titles) == (inference == "model-process")
        assert psutil.Process(server.proc.pid).cmdline()[0] == "lungserve: supervisor"
        # The supervisor became a lean program by exec (same pid): none of the app's native code.
        assert _native_modules(server.proc.pid) == set()
        assert set().union(*map(_native_modules, children(server).values())) == set(HEAVY)  # the probe finds them
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            image = noise_jpeg(256)
            one = await client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
            assert one.status_code == 200, one.text
            assert one.json()["model"]["name"]
            many = await client.post(
                "/predict-many", files=[("files", (f"{i}.jpg", image, "image/jpeg")) for i in range(3)]
            )
            assert many.status_code == 200, many.text
            assert len(many.json()["results"]) == 3
            explained = await client.post("/explain", files={"file": ("a.jpg", image, "image/jpeg")})
            assert explained.status_code == 200, explained.text
            assert (await client.get("/model")).json()["provider"] == "CPUExecutionProvider"
            # One /metrics for the whole server, whichever front answers the scrape.
            before = _samples((await client.get("/metrics")).text)
            for _ in range(6):  # new connections: the kernel spreads them over the fronts
                r = await client.post(
                    "/predict", files={"file": ("a.jpg", image, "image/jpeg")}, headers={"Connection": "close"}
                )
                assert r.status_code == 200
            after = _samples((await client.get("/metrics", headers={"Connection": "close"})).text)
            assert after['lungserve_images_total{outcome="ok"}'] - before['lungserve_images_total{outcome="ok"}'] == 6
            # Batches (the model process's, or each front's): their sizes add up to the images.
            assert after["lungserve_batch_size_sum"] - before["lungserve_batch_size_sum"] == 6
            assert after["lungserve_model_ready"] == 1
            # Per process: the batching processes' own series, summing to the server's.
            batching = ["model"] if inference == "model-process" else ["front 0", "front 1"]
            per_process = [f'lungserve_process_batch_size_sum{{process="{p}"}}' for p in batching]
            # A front the kernel hashed no connection to has no batch series yet (7 connections: 1 in 64).
            assert sum(after.get(k, 0.0) - before.get(k, 0.0) for k in per_process) == 6
            assert all(f'lungserve_process_queue_depth{{process="{p}"}}' in after for p in batching)
            assert after['lungserve_process_restarts_total{role="front"}'] == 0
            # Bounded labels: no series per process id (a gauge without a multiprocess mode).
            assert not [k for k in after if 'pid="' in k]
        # OIP over gRPC: every front serves the one port (SO_REUSEPORT), fresh channels each time.
        assert server.output().count("Open Inference Protocol over gRPC on") == 2
        for _ in range(4):
            assert await asyncio.to_thread(_grpc_infer, grpc_port, image) == one.json()["label"]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT_S) == 0


async def test_model_process_then_a_front_killed_under_load(tmp_path: Path) -> None:
    """The `scale-faults` bar: only 200s and JSON 503s, readiness back, a replacement front."""
    with start_server(tmp_path, **TOPOLOGY) as server:
        await wait_ready(server)
        await until(lambda: _all_ready(server), "every process ready")
        image = noise_jpeg(256)
        statuses: list[int] = []
        bad: list[str] = []
        broken_connections = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal broken_connections
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
                while not stop.is_set():
                    try:
                        r = await client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
                    except httpx.TransportError:
                        broken_connections += 1  # a request on the SIGKILLed front's connection
                        continue
                    statuses.append(r.status_code)
                    if r.status_code not in (200, 503) or ("error" not in r.json() and r.status_code == 503):
                        bad.append(f"{r.status_code} {r.text[:200]}")

        loaders = [asyncio.ensure_future(load()) for _ in range(6)]
        await until(lambda: _async(len(statuses) >= 20), "load flowing")

        model = children(server)["lungserve: model"]
        os.kill(model, signal.SIGKILL)
        await until(lambda: _not_ready(server), "readiness 503 once the model process is gone")
        await until(lambda: _async(children(server).get("lungserve: model") not in (None, model)), "a new model")
        await until(lambda: _ready(server), "readiness back after the restart and warm-up")
        served_after_restart = statuses.count(200)
        await until(lambda: _async(statuses.count(200) > served_after_restart + 10), "served again")

        front = children(server)["lungserve: front 0"]
        os.kill(front, signal.SIGKILL)
        await until(lambda: _async(children(server).get("lungserve: front 0") not in (None, front)), "a new front 0")
        served = statuses.count(200)
        await until(lambda: _async(statuses.count(200) > served + 10), "served after the front was replaced")
        stop.set()
        await asyncio.gather(*loaders)

        assert not bad, bad[:5]
        assert 503 in statuses  # the images waiting on the killed model process
        async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
            counted = _samples((await client.get("/metrics")).text)
        assert counted['lungserve_process_restarts_total{role="model"}'] == 1
        assert counted['lungserve_process_restarts_total{role="front"}'] == 1
        server.proc.send_signal(signal.SIGTERM)
        assert _exit_status(server) == 0
        log = server.output()
        assert "model process exited" in log
        assert "restarting" in log


async def test_each_front_accepts_on_its_own_socket_and_connections_spread_over_them(tmp_path: Path) -> None:
    """The public port is one SO_REUSEPORT group with a socket per front: the kernel hashes new
    connections over the fronts. (On one shared socket the quicker front took them: 32/0 seen.)"""
    with start_server(tmp_path, **{**TOPOLOGY, "LUNGSERVE_INFERENCE": "in-front"}) as server:
        await wait_ready(server)
        await until(lambda: _all_ready(server), "every process ready")
        fronts = [pid for title, pid in children(server).items() if title.startswith("lungserve: front")]
        port = int(server.url.rsplit(":", 1)[1])
        listening = {pid: _listening_inodes(pid, port) for pid in fronts}
        assert all(len(inodes) == 1 for inodes in listening.values()), listening
        assert len(set().union(*listening.values())) == 2  # two sockets, not one shared
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        try:

            async def all_accepted() -> bool:
                return sum(_accepted(pid, port) for pid in fronts) == 32

            await until(all_accepted, "all 32 connections accepted")
            spread = [_accepted(pid, port) for pid in fronts]
            # 2 x 2^-32 that a hash puts every one on the same front.
            assert min(spread) >= 1, spread
        finally:
            for c in clients:
                c.close()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT_S) == 0


def _listening_inodes(pid: int, port: int) -> set[int]:
    """The inodes of the listening sockets on `port` that process `pid` holds."""
    fds = {c.fd for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    return {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in fds}


def _accepted(pid: int, port: int) -> int:
    return sum(
        1 for c in psutil.Process(pid).net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == port
    )


def _grpc_infer(port: int, image: bytes) -> str:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = grpcclient.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        labels = client.infer(MODEL_NAME, [tensor]).as_numpy("label")
    finally:
        client.close()
    assert labels is not None
    value = labels.tolist()[0]
    return value.decode() if isinstance(value, bytes) else str(value)


async def _all_ready(server: Server) -> bool:
    """Every process of the server ready. lungserve_model_ready is the minimum over the processes
    that have written it, so a front still importing would not count: each must also show its
    own per-process series (written when its metrics exist, before it can be ready)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        samples = _samples((await client.get("/metrics")).text)
    # (A front whose model is remote is ready only once the model process, which wrote its own
    # series before it listened, answers it.)
    present = all(f'lungserve_process_queue_depth{{process="front {i}"}}' in samples for i in range(2))
    return present and samples.get("lungserve_model_ready") == 1


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def _async(value: bool) -> bool:
    return value


async def _ready(server: Server) -> bool:
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        return (await client.get("/health/ready")).status_code == 200


async def _not_ready(server: Server) -> bool:
    # Both fronts must say so: ask a few times (the kernel spreads connections over them).
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        answers = [(await client.get("/health/ready", headers={"Connection": "close"})) for _ in range(4)]
    return all(a.status_code == 503 and a.json()["error"]["code"] == "model_not_ready" for a in answers)


async def test_reload_in_the_model_process_under_load_by_admin_and_sighup(tmp_path: Path) -> None:
    """/admin/reload on any front and SIGHUP to the supervisor swap the model inside the model
    process: every front then answers with it, and no request fails meanwhile."""
    folder = tmp_path / "model"
    write_model_v2_dir(folder, version="2")
    env = {**TOPOLOGY, "LUNGSERVE_MODEL_URI": str(folder), "LUNGSERVE_ADMIN_TOKEN": "t0ken"}
    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        await until(lambda: _all_ready(server), "every process ready")
        image = noise_jpeg(256)
        versions: list[str] = []
        bad: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
                while not stop.is_set():
                    r = await client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
                    if r.status_code != 200:
                        bad.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    versions.append(r.json()["model"]["version"])

        loaders = [asyncio.ensure_future(load()) for _ in range(4)]
        await until(lambda: _async(len(versions) >= 10), "load flowing")
        write_model_v2_dir(folder, version="3", bias=[0.0, 1.0, 0.0])
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as admin:
            answer = await admin.post("/admin/reload", headers={"Authorization": "Bearer t0ken"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["current"]["version"] == "3"
        seen = len(versions)
        await until(lambda: _async(versions[seen:].count("3") >= 10), "answers of version 3")
        assert "2" not in versions[seen + 8 :]  # every front serves the new model (a few were in flight)
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            info = {
                k: v
                for k, v in _samples((await client.get("/metrics")).text).items()
                if k.startswith("lungserve_model_info{")
            }
        assert [k for k, v in info.items() if v == 1] == [k for k in info if 'version="3"' in k], info

        write_model_v2_dir(folder, version="4", bias=[1.0, 0.0, 0.0])
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: _async("4" in versions), "answers of version 4 after SIGHUP")
        stop.set()
        await asyncio.gather(*loaders)
        assert not bad, bad[:5]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT_S) == 0


@pytest.mark.parametrize("inference", ["model-process", "in-front"])
async def test_a_model_that_cannot_load_stops_the_supervisor_with_status_3(tmp_path: Path, inference: str) -> None:
    env = {**TOPOLOGY, "LUNGSERVE_INFERENCE": inference, "LUNGSERVE_MODEL_URI": str(tmp_path / "missing")}
    with start_server(tmp_path, **env) as server:
        assert server.proc.wait(TIMEOUT_S) == 3
        assert "could not start (status 3)" in server.output()


async def test_in_front_the_queue_limit_holds_across_fronts(tmp_path: Path) -> None:
    """With a model in each front, LUNGSERVE_QUEUE_LIMIT is still the server's: while one front
    holds every slot, the other answers 503 + Retry-After from the request's headers (no byte of
    the body read), though it holds nothing itself; then the slots come back. Both ways round."""
    limit = 8
    env = {
        **TOPOLOGY,
        "LUNGSERVE_INFERENCE": "in-front",
        "LUNGSERVE_QUEUE_LIMIT": str(limit),
        "LUNGSERVE_MAX_FILES_PER_REQUEST": str(limit),
    }
    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        await until(lambda: _all_ready(server), "every process ready")
        fronts = ("lungserve: front 0", "lungserve: front 1")
        await until(lambda: _async(set(fronts) <= set(children(server))), "both fronts titled")
        pids = [children(server)[title] for title in fronts]
        cells = _queue_cells(pids[0])
        port = int(server.url.rsplit(":", 1)[1])
        image = noise_jpeg(1536)  # decoding 8 of these keeps the slots held long enough to see
        try:
            for holder, other in ((0, 1), (1, 0)):
                refused = await asyncio.to_thread(_refused_while_held, port, pids, cells, holder, other, image, limit)
                assert refused.status == 503, refused.body
                assert refused.code == "overloaded"
                assert refused.headers.get("retry-after") == "1"
                assert int(cells.sum()) == 0  # every slot came back once the holder answered
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            r = await client.post("/predict", files={"file": ("a.jpg", image, "image/jpeg")})
            assert r.status_code == 200, r.text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT_S) == 0


def _queue_cells(front: int) -> Cells:
    """The server's shared queue bound (one int64 cell per front), mapped read-only: the file
    every front has open."""
    files = {Path(f.path) for f in psutil.Process(front).open_files()}
    (path,) = {f for f in files if f.name == "queue" and f.parent.name.startswith("lungserve-")}
    return np.memmap(path, dtype=np.int64, mode="r", shape=(MAX_FRONTS,))


def _refused_while_held(
    port: int,
    pids: list[int],
    cells: Cells,
    holder: int,
    other: int,
    image: bytes,
    limit: int,
) -> rawhttp.RawResponse:
    """Front `holder` admits `limit` images and is frozen holding every slot (SIGSTOP); a
    request on a connection front `other` accepted is then answered; `holder` resumes and
    answers 200. (Each front has its own socket: see `rawhttp.connect_via`.)"""
    body = rawhttp.Multipart()
    for i in range(limit):
        body.add("files", image, f"{i}.jpg")
    request = rawhttp.request("POST", "/predict-many", body.body(), [("Content-Type", body.content_type)])
    for _ in range(ATTEMPTS):
        with rawhttp.connect_via(pids[holder], port) as held, rawhttp.connect_via(pids[other], port) as spare:
            rawhttp.send_all(held, request)
            # Its slots are taken once the body is in, then held while 8 images decode and run:
            # freeze the holder in that window (a miss, the answer arriving first, is retried).
            while cells[holder] < limit and not select.select([held], [], [], 0)[0]:
                pass
            _freeze(pids[holder])
            if cells[holder] == limit:  # frozen: nothing changes it now
                # Headers only, a body announced but never sent: the answer cannot wait for it.
                probe = rawhttp.request(
                    "POST", "/predict", headers=[("Content-Type", body.content_type), ("Content-Length", "100000")]
                )
                rawhttp.send_all(spare, probe)
                refused = rawhttp.read_response(spare)
                os.kill(pids[holder], signal.SIGCONT)
                answer = rawhttp.read_response(held)
                assert answer.status == 200, answer.body[:300]
                assert len(answer.json()["results"]) == limit
                return refused
            os.kill(pids[holder], signal.SIGCONT)
            assert rawhttp.read_response(held).status == 200
    pytest.fail(f"front {holder} answered before it could be seen holding every slot, {ATTEMPTS} times")


def _freeze(pid: int) -> None:
    """SIGSTOP, then wait until the kernel has really stopped it (bounded)."""
    os.kill(pid, signal.SIGSTOP)
    process = psutil.Process(pid)
    deadline = time.monotonic() + TIMEOUT_S
    while process.status() != psutil.STATUS_STOPPED:
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} not stopped within {TIMEOUT_S} s")
        time.sleep(0.001)
