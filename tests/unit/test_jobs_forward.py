"""The /jobs forwarder of a front that does not run slide jobs (service.http.jobs_forward).

Real uvicorn servers in this process: a front (RequestContextMiddleware around JobsForwarder) on
127.0.0.1, and in place of front 0 a small ASGI app on a Unix socket that answers with what it
received. Synchronised on events the two ends set (a chunk arrived), never on sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send

from service.http.jobs_forward import JobsForwarder, JobsLink, TrustPrivateSocket, private_socket
from service.http.middleware import RequestContextMiddleware
from service.observability.job_metrics import JobMetrics

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024


@dataclass
class Counted:
    """The front's request metrics (RequestContextMiddleware's observer)."""

    requests: list[tuple[str, int]] = field(default_factory=list)

    def observe_request(self, route: str, status: int, duration_s: float) -> None:
        self.requests.append((route, status))


@dataclass
class Pair:
    front: str  # the front's URL
    counted: Counted
    registry: CollectorRegistry

    def forwarded(self, outcome: str) -> float:
        return self.registry.get_sample_value("lungserve_jobs_forwarded_total", {"outcome": outcome}) or 0.0


async def _local(scope: Scope, receive: Receive, send: Send) -> None:
    """The front's own app (every route not under /jobs)."""
    await _json(send, 200, {"answered_by": "front"})


async def _json(send: Send, status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(
    app: Callable[[Scope, Receive, Send], Awaitable[None]], sock: socket.socket, **config: Any
) -> AsyncIterator[None]:
    sock.listen(16)  # connections wait in the backlog until uvicorn accepts them: no start-up race
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, **config))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        yield
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def pair(
    tmp_path: Path, owner: Callable[[Scope, Receive, Send], Awaitable[None]] | None, **front_config: Any
) -> AsyncIterator[Pair]:
    """A front forwarding to `owner` on a Unix socket (None: nothing there, as when front 0 is down)."""
    path = tmp_path / "jobs.sock"
    counted, registry = Counted(), CollectorRegistry()
    link = JobsLink(path, retry_after_s=2, metrics=JobMetrics(registry, "lungserve"))
    front_app = RequestContextMiddleware(JobsForwarder(_local, link), metrics=counted)
    tcp = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{tcp.getsockname()[1]}"
    # As `lungserve serve` without LUNGSERVE_FORWARDED_ALLOW_IPS: no proxy trusted (uvicorn's
    # default would believe 127.0.0.1).
    async with serving(front_app, tcp, **{"proxy_headers": False, **front_config}):
        if owner is None:
            yield Pair(url, counted, registry)
        else:
            async with serving(TrustPrivateSocket(owner, path), private_socket(path)):
                yield Pair(url, counted, registry)
    await link.aclose()


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Front 0's stand-in: the request as it arrived, and a Server header of its own."""
    digest, size = hashlib.sha256(), 0
    while True:
        message = await receive()
        digest.update(message.get("body", b""))
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await _json(
        send,
        201,
        {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "scheme": scope["scheme"],
            "client": list(scope["client"]) if scope.get("client") else None,
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "size": size,
            "sha256": digest.hexdigest(),
        },
        headers=[(b"server", b"front-0"), (b"x-owner", b"yes")],
    )


async def test_a_request_crosses_with_its_id_key_and_host_and_its_answer_comes_back(tmp_path: Path) -> None:
    async with pair(tmp_path, echo) as p, httpx.AsyncClient(base_url=p.front) as client:
        response = await client.get(
            "/jobs/abc?x=1",
            headers={
                "Authorization": "Bearer k",
                "X-Request-ID": "r-1",
                "Origin": "http://elsewhere",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https",
            },
        )
        other = await client.get("/metrics")
    assert other.json() == {"answered_by": "front"}  # only /jobs is forwarded
    assert response.status_code == 201
    assert response.headers["x-request-id"] == "r-1"
    assert response.headers["x-owner"] == "yes"
    assert response.headers.get_list("server") == ["uvicorn"]  # the front's, once
    seen = response.json()
    headers = dict(seen["headers"])
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/jobs/abc", "x=1")
    assert headers["authorization"] == "Bearer k"
    assert headers["x-request-id"] == "r-1"
    assert headers["host"] == p.front.removeprefix("http://")  # status_url is built from it
    assert "origin" not in headers  # CORS headers are the front's to add, once
    # What the front saw, not what the client claimed (the front trusts no proxy here).
    assert seen["scheme"] == "http"
    assert seen["client"] == ["127.0.0.1", 0]
    # Front 0 counts it (and writes its access line): the front does not, a second time.
    assert p.counted.requests == [("unmatched", 200)]  # the /metrics request, this front's own
    assert p.forwarded("answered") == 1


async def test_behind_a_trusted_proxy_front_0_sees_the_scheme_the_front_saw(tmp_path: Path) -> None:
    trusted = {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1"}
    async with pair(tmp_path, echo, **trusted) as p, httpx.AsyncClient(base_url=p.front) as client:
        response = await client.get("/jobs", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"})
    assert response.json()["scheme"] == "https"
    assert response.json()["client"] == ["10.1.2.3", 0]


async def test_the_body_and_the_answer_are_streamed_not_held(tmp_path: Path) -> None:
    arrived = asyncio.Event()  # front 0 has the first chunk: the client has not sent the rest yet
    received = asyncio.Event()  # the client has the first part of the answer: front 0 has not sent the rest

    async def owner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            first: Message = await receive()
            assert first["more_body"]
            arrived.set()
            await echo(scope, _prepend(first, receive), send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a" * CHUNK, "more_body": True})
        await received.wait()
        await send({"type": "http.response.body", "body": b"b" * CHUNK})

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * CHUNK
        await arrived.wait()
        yield b"y" * CHUNK

    async with pair(tmp_path, owner) as p, httpx.AsyncClient(base_url=p.front, timeout=30.0) as client:
        posted = await client.post("/jobs", content=body())
        assert posted.json()["size"] == 2 * CHUNK
        assert posted.json()["sha256"] == hashlib.sha256(b"x" * CHUNK + b"y" * CHUNK).hexdigest()
        async with client.stream("GET", "/jobs/1/classmap.png") as response:
            parts = b""
            async for part in response.aiter_raw():
                parts += part
                if len(parts) >= CHUNK:
                    received.set()
    assert parts == b"a" * CHUNK + b"b" * CHUNK


def _prepend(first: Message, receive: Receive) -> Receive:
    pending = [first]

    async def again() -> Message:
        return pending.pop() if pending else await receive()

    return again


async def test_dot_segments_reach_front_0_as_the_front_saw_them(tmp_path: Path) -> None:
    async with pair(tmp_path, echo) as p:
        host, port = p.front.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /jobs/../jobs/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")  # as curl --path-as-is
        raw = await reader.read()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201")
    assert json.loads(body)["path"] == "/jobs/../jobs/x"  # not resolved to /jobs/x on the way


@pytest.mark.parametrize("how", ["no socket", "bound, not listening", "hangs up without answering"])
async def test_front_0_not_answering_is_a_json_503_with_retry_after(tmp_path: Path, how: str) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # it has the request: then it is gone
        writer.close()

    async with pair(tmp_path, None) as p:
        path = tmp_path / "jobs.sock"
        bound = private_socket(path) if how != "no socket" else None
        server = await asyncio.start_unix_server(hang_up, sock=bound) if how == "hangs up without answering" else None
        async with httpx.AsyncClient(base_url=p.front) as client:
            response = await client.post("/jobs", headers={"X-Request-ID": "r-9"}, content=b"{}")
        if server is not None:
            server.close()
        elif bound is not None:
            bound.close()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-request-id"] == "r-9"
    assert response.json()["error"]["code"] == "jobs_unavailable"
    assert response.json()["error"]["request_id"] == "r-9"
    assert p.counted.requests == [("unmatched", 503)]  # this front answered: it counts it
    assert p.forwarded("unavailable") == 1
