"""Hostile and unlucky clients against lungserve: the table of docs/reliability.md as one command.

    python loadtest/chaos.py --url http://127.0.0.1:8000            # rows against a running server
    python loadtest/chaos.py --url http://127.0.0.1:8000 --out docs/reliability-chaos.md

Rows 1-9, 12, 14-19, 21 and the overload run go to the server at --url (started with default
settings, e.g. `lungserve serve`). Rows 10, 11, 13, 20, 22 and the SIGTERM run need to stop a server or
other settings, so the script starts its own `lungserve serve` on a free loopback port for
each (the same Python, so the same code). Everything is loopback, every wait is bounded.

It prints one Markdown table: row, what was sent, held / FAILED, and the figures measured.
Exit status 1 when a row failed. RSS figures come from the server's own
`process_resident_memory_bytes` in /metrics (sampled every 0.2 s during bursts).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: the attack builders shared with the tests

from tests.hostile_files import (  # noqa: E402  (after the path set-up above)
    cut_after_scans,
    cut_at,
    nested_json,
    progressive,
    scan_bomb,
    scan_starts,
    tiled_tiff_claiming,
)

TIMEOUT_S = 60.0


# --- a minimal HTTP/1.1 client over asyncio streams (full control over bytes and timing) ----


@dataclass
class Answer:
    status: int  # 0: no answer (connection refused, reset or closed first)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    error: str = ""

    @property
    def code(self) -> str | None:
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        err = data.get("error") if isinstance(data, dict) else None
        return err.get("code") if isinstance(err, dict) else None

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")


def form(field_name: str, files: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="f{i}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(path: str, body: bytes, ctype: str, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: lungserve\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: lungserve\r\nConnection: close\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader, started: float) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body, time.perf_counter() - started)


async def call(host: str, port: int, raw: bytes, limit_s: float = TIMEOUT_S) -> Answer:
    started = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            with suppress(ConnectionResetError, BrokenPipeError):
                await writer.drain()  # answered early and closed: the answer is still readable
            return await read_answer(reader, started)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
        return Answer(0, seconds=time.perf_counter() - started, error=type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()


class Target:
    def __init__(self, url: str) -> None:
        hostport = url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.partition(":")
        self.host, self.port = host, int(port or 80)

    async def call(self, raw: bytes, limit_s: float = TIMEOUT_S) -> Answer:
        return await call(self.host, self.port, raw, limit_s)

    async def metrics(self) -> dict[str, float]:
        answer = await self.call(get("/metrics"), 10)
        out: dict[str, float] = {}
        for line in answer.body.decode(errors="replace").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with suppress(ValueError):
                    out[name] = float(value)
        return out

    async def rss_mib(self) -> float:
        return (await self.metrics()).get("process_resident_memory_bytes", float("nan")) / 2**20

    async def model(self) -> dict[str, Any]:
        return dict(json.loads((await self.call(get("/model"), 10)).body))


@asynccontextmanager
async def rss_sampler(target: Target) -> AsyncIterator[list[float]]:
    samples: list[float] = []

    async def loop() -> None:
        while True:
            samples.append(await target.rss_mib())
            await asyncio.sleep(0.2)

    task = asyncio.create_task(loop())
    try:
        yield samples
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def settle_rss(target: Target, seconds: float = 5.0) -> float:
    """RSS after `seconds` of idleness (the heap trim runs after large work)."""
    await asyncio.sleep(seconds)
    return await target.rss_mib()


# --- payloads -----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tile(seed: int = 0, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG", quality=90)


TILE = tile()
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n"


def claimed(width: int, height: int) -> bytes:
    sof = TILE.find(b"\xff\xc0")
    b = bytearray(TILE)
    b[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(b)


# --- outcome table ----------------------------------------------------------------------------


@dataclass
class Row:
    row: str
    sent: str
    held: bool
    figures: str


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ms(values: list[float], q: float) -> str:
    if not values:
        return "n/a"
    return f"{np.quantile(np.array(values), q) * 1000:.0f} ms"


# --- scenarios against the running server -------------------------------------------------------


async def single_requests(t: Target) -> list[Row]:
    rows = []
    cases: list[tuple[str, str, bytes, int, str]] = [
        ("1", "224 px JPEG, header edited to 7000x7000", claimed(7000, 7000), 422, "invalid_image"),
        ("2", "truncated JPEG + EOI marker", TILE[: len(TILE) // 3] + b"\xff\xd9", 422, "invalid_image"),
    ]
    for name, data, want, code in cases_formats():
        cases.append(("3", name, data, want, code))
    cases.append(
        (
            "4",
            "EPS (would start Ghostscript)",
            EPS,
            422,
            "invalid_image",
        )
    )
    by_row: dict[str, list[tuple[str, Answer, int, str]]] = {}
    for row, name, data, want, code in cases:
        body, ctype = form("file", [data])
        answer = await t.call(post("/predict", body, ctype))
        by_row.setdefault(row, []).append((name, answer, want, code))
    for row, results in by_row.items():
        held = all(a.status == w and a.code == c for _, a, w, c in results)
        figures = ", ".join(f"{n}: {a.status} {a.code}" for n, a, _, _ in results)
        sent = results[0][0] if len(results) == 1 else "GIF, 2,000-frame GIF, WebP, ICO, PCX, PPM"
        rows.append(Row(row, sent, held, figures))
    return rows


def cases_formats() -> list[tuple[str, bytes, int, str]]:
    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    frames = [Image.new("P", (32, 32), i % 256) for i in range(2000)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = [(f, encode(small, f), 422, "invalid_image") for f in ("GIF", "WEBP", "ICO", "PCX", "PPM")]
    out.insert(1, ("GIF x2000", buf.getvalue(), 422, "invalid_image"))
    return out


async def ordinary_clients(t: Target, stop: asyncio.Event, n: int = 4) -> list[Answer]:
    """`n` closed-loop clients sending one tile each until `stop`; their answers."""
    body, ctype = form("file", [TILE])
    raw = post("/predict", body, ctype)
    answers: list[Answer] = []

    async def client() -> None:
        while not stop.is_set():
            answers.append(await t.call(raw, 30))

    await asyncio.gather(*(client() for _ in range(n)))
    return answers


async def row5_slow_uploads(t: Target, count: int) -> Row:
    body, ctype = form("file", [TILE])
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    async def trickle() -> Answer:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(t.host, t.port)
        except OSError as exc:
            return Answer(0, error=type(exc).__name__)
        try:
            writer.write(head)
            read = asyncio.create_task(read_answer(reader, started))
            for i in range(len(body)):  # 10 bytes/s
                if read.done():
                    break
                writer.write(body[i : i + 1])
                await asyncio.wait({read}, timeout=0.1)
            async with asyncio.timeout(TIMEOUT_S):
                return await read
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            return Answer(0, seconds=time.perf_counter() - started, error=type(exc).__name__)
        finally:
            writer.close()

    stop = asyncio.Event()
    trickles = asyncio.gather(*(trickle() for _ in range(count)))
    await asyncio.sleep(0.5)  # the trickles are connected and holding whatever they hold
    ordinary = asyncio.create_task(ordinary_clients(t, stop))
    slow = await trickles
    stop.set()
    others = await ordinary
    ok = sum(a.status == 200 for a in others)
    cut = [a.seconds for a in slow if a.status == 408]
    held = ok == len(others) and len(others) > 0 and len(cut) == count
    return Row(
        "5",
        f"{count} uploads at 10 bytes/s (queue limit {count}) + 4 ordinary clients",
        held,
        f"ordinary clients: {ok}/{len(others)} answered 200 while the trickles ran; "
        f"trickles: {len(cut)}/{count} got 408 upload_too_slow, median after {median(cut):.1f} s",
    )


async def row6_slow_headers(t: Target, count: int) -> Row:
    async def slow_header() -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(t.host, t.port)
        except OSError:
            return (0.0, False)
        line = b"GET /health/live HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        closed = False
        try:
            for i in range(len(line)):
                writer.write(line[i : i + 1])
                try:
                    async with asyncio.timeout(1.0):
                        data = await reader.read(65536)
                    if data or reader.at_eof():
                        closed = True
                        break
                except TimeoutError:
                    pass
                if time.perf_counter() - started > 60:
                    break
        except OSError:
            closed = True
        finally:
            writer.close()
        return (time.perf_counter() - started, closed)

    stop = asyncio.Event()
    held_conns = asyncio.gather(*(slow_header() for _ in range(count)))
    await asyncio.sleep(1.0)
    ordinary = asyncio.create_task(ordinary_clients(t, stop))
    results = await held_conns
    stop.set()
    others = await ordinary
    closed = [s for s, c in results if c]
    ok = sum(a.status == 200 for a in others)
    held = len(closed) == count and ok == len(others) and len(others) > 0
    return Row(
        "6",
        f"{count} connections sending headers at 1 byte/s + 4 ordinary clients",
        held,
        f"closed by the server: {len(closed)}/{count} (max after {max(closed) if closed else float('nan'):.1f} s); "
        f"ordinary clients meanwhile: {ok}/{len(others)} answered 200",
    )


async def row7_huge_header(t: Target, megabytes: int) -> Row:
    before = await t.rss_mib()
    reader, writer = await asyncio.open_connection(t.host, t.port)
    started = time.perf_counter()
    answer_task = asyncio.create_task(read_answer(reader, started))  # read while sending
    writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    chunk = b"a" * 65536
    try:
        while sent < megabytes * 2**20 and not answer_task.done():
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        async with asyncio.timeout(10):
            answer = await answer_task
    except (asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
        answer = Answer(0, error=type(exc).__name__)
    writer.close()
    after = await t.rss_mib()
    # The server answers 431 and closes; a client still sending may see a reset instead of the
    # answer (TCP discards it when unread bytes are left at close): either way it is cut off.
    held = answer.status in (431, 0) and sent < 16 * 2**20 and after - before < 20
    got = f"{answer.status} {answer.code}" if answer.status else f"connection reset ({answer.error})"
    return Row(
        "7",
        f"one {megabytes} MB request header",
        held,
        f"{got}; the client had sent {sent / 2**20:.1f} MB when the server cut it off; "
        f"RSS {before:.0f} -> {after:.0f} MiB",
    )


def big_png(side: int) -> bytes:
    return encode(Image.new("RGB", (side, side), (180, 120, 200)), "PNG")


async def tile_latency_during(t: Target, work: Awaitable[Any]) -> tuple[Any, list[float]]:
    stop = asyncio.Event()
    probe = asyncio.create_task(ordinary_clients(t, stop, n=1))
    result = await work
    stop.set()
    answers = await probe
    return result, [a.seconds for a in answers if a.status == 200]


async def row8_pixel_bombs(t: Target, requests: int) -> Row:
    png = big_png(7000)
    body, ctype = form("files", [png] * 64)
    raw = post("/predict-many", body, ctype)
    before = await t.rss_mib()
    async with rss_sampler(t) as samples:
        answers, lat = await tile_latency_during(t, asyncio.gather(*(t.call(raw, 120) for _ in range(requests))))
    after = await settle_rss(t)
    codes: dict[str, int] = {}
    for a in answers:
        if a.status == 200:
            for x in json.loads(a.body)["results"]:
                key = x.get("error", {}).get("code", "ok")
                codes[key] = codes.get(key, 0) + 1
        else:
            codes[f"HTTP {a.status}"] = codes.get(f"HTTP {a.status}", 0) + 1
    peak = max(samples, default=float("nan"))
    slowest = max(a.seconds for a in answers)
    held = bool(lat) and max(lat) < 2.0 and after - before < 100
    return Row(
        "8",
        f"{requests} concurrent /predict-many of 64 PNGs 7000x7000 ({len(body) / 2**20:.1f} MB each)",
        held,
        f"images: {codes}; slowest request {slowest:.1f} s; a concurrent tile: p50 {fmt_ms(lat, 0.5)}, "
        f"max {max(lat) * 1000 if lat else float('nan'):.0f} ms ({len(lat)} tiles); "
        f"RSS before {before:.0f}, peak {peak:.0f}, 5 s after {after:.0f} MiB",
    )


async def row9_big_bodies(t: Target, requests: int, megabytes: int) -> Row:
    filler = TILE + bytes(megabytes * 2**20 // 64 - len(TILE))
    body, ctype = form("files", [filler] * 64)
    before = await t.rss_mib()

    async def send() -> tuple[Answer, int]:
        """As curl sends big bodies: `Expect: 100-continue`, the body only after 100 Continue."""
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(t.host, t.port)
        except OSError as exc:
            return Answer(0, error=type(exc).__name__), 0
        head = (
            f"POST /predict-many HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        writer.write(head.encode())
        sent = 0
        try:
            async with asyncio.timeout(120):
                first = await read_answer(reader, started)
                if first.status != 100:
                    return first, 0  # answered before a byte of the body was sent
                view = memoryview(body)
                while sent < len(body):
                    writer.write(view[sent : sent + (1 << 20)])
                    await writer.drain()
                    sent += 1 << 20
                return await read_answer(reader, started), len(body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            return Answer(0, error=type(exc).__name__), sent
        finally:
            writer.close()

    async with rss_sampler(t) as samples:
        results = await asyncio.gather(*(send() for _ in range(requests)))
    after = await settle_rss(t)
    peak = max(samples, default=float("nan"))
    early = [s for a, s in results if a.status == 503]
    statuses = sorted(a.status for a, _ in results)
    bound = 256 + 2 * megabytes  # MAX_BODY_BYTES_IN_FLIGHT default plus one body of copies
    held = peak - before < bound and all(s == 0 for s in early) and all(st in (200, 503) for st in statuses)
    return Row(
        "9",
        f"{requests} concurrent /predict-many bodies of {len(body) / 2**20:.0f} MB",
        held,
        f"statuses {statuses}; every 503 came before the body was sent: {all(s == 0 for s in early)}; "
        f"RSS before {before:.0f}, peak {peak:.0f} (+{peak - before:.0f}, bound +{bound}), 5 s after {after:.0f} MiB",
    )


async def row12_connection_close(t: Target) -> Row:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(t.host, t.port)
    writer.write(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    answer = await read_answer(reader, started)
    try:
        async with asyncio.timeout(5):
            eof = await reader.read(1) == b""
    except (TimeoutError, OSError):
        eof = False
    writer.close()
    closed_after = time.perf_counter() - started
    held = answer.headers.get("connection") == "close" and eof
    return Row(
        "12",
        "an early 413 on an unread 100 MB body",
        held,
        f"{answer.status} {answer.code}, Connection: {answer.headers.get('connection')}, "
        f"closed by the server after {closed_after:.2f} s",
    )


async def row14_disconnects(t: Target, clients: int) -> Row:
    m0 = await t.metrics()
    body, ctype = form("files", [tile(i, 768) for i in range(8)])
    busy = post("/predict-many", body, ctype)
    one, ctype1 = form("file", [TILE])
    raw = post("/predict", one, ctype1)

    async def leave_early() -> None:
        try:
            _reader, writer = await asyncio.open_connection(t.host, t.port)
            writer.write(raw)
            await writer.drain()
            await asyncio.sleep(0.05)  # admitted, queued behind the busy work; then gone
            writer.transport.abort()
        except OSError:
            pass

    background = [asyncio.create_task(t.call(busy, 60)) for _ in range(8)]
    await asyncio.gather(*(leave_early() for _ in range(clients)))
    await asyncio.gather(*background)
    for _ in range(100):  # wait (bounded) for the queue to be empty
        m = await t.metrics()
        if m.get("lungserve_queue_depth", 0) == 0 and m.get("lungserve_batches_in_flight", 0) == 0:
            break
        await asyncio.sleep(0.1)
    m1 = await t.metrics()

    def total(prefix: str, metrics: dict[str, float]) -> float:
        return sum(v for k, v in metrics.items() if k.startswith(prefix))

    images = total("lungserve_images_total", m1) - total("lungserve_images_total", m0)
    rejected = total("lungserve_rejected_total", m1) - total("lungserve_rejected_total", m0)
    expected = clients + 8 * 8
    held = images + rejected == expected
    return Row(
        "14",
        f"{clients} clients leaving mid-queue behind 8 busy /predict-many",
        held,
        f"images_total grew by {images:.0f} and rejected_total (never admitted) by {rejected:.0f}: "
        f"{images + rejected:.0f} outcomes for {expected} images sent",
    )


class Pool:
    """Keep-alive connections for the load runs: a new TCP connection per request would make the
    client (and the server's accept loop) the bottleneck long before the model."""

    def __init__(self, t: Target, size: int) -> None:
        self.t = t
        self.size = size
        self.opened = 0
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, raw: bytes, limit_s: float) -> Answer:
        for attempt in range(2):  # a pooled connection the server closed meanwhile: once more, fresh
            reused = bool(self.idle)
            if reused:
                reader, writer = self.idle.pop()
            elif self.opened >= self.size:
                return Answer(0, error="client pool exhausted")
            else:
                try:
                    reader, writer = await asyncio.open_connection(self.t.host, self.t.port)
                except OSError as exc:
                    return Answer(0, error=type(exc).__name__)
                self.opened += 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(limit_s):
                    writer.write(raw)
                    await writer.drain()
                    answer = await read_answer(reader, started)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                writer.close()
                self.opened -= 1
                if reused and attempt == 0 and not isinstance(exc, TimeoutError):
                    continue
                return Answer(0, seconds=time.perf_counter() - started, error=type(exc).__name__)
            if answer.headers.get("connection", "").lower() == "close":
                writer.close()
                self.opened -= 1
            else:
                self.idle.append((reader, writer))
            return answer
        return Answer(0, error="unreachable")

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def overload(t: Target, seconds: float) -> Row:
    body, ctype = form("file", [TILE])
    raw = post("/predict", body, ctype)
    pool = Pool(t, 4096)
    # Capacity: closed loop at 32 keep-alive clients for 15 s, with this same client.
    stop = asyncio.Event()
    base: list[Answer] = []

    async def closed_loop() -> None:
        while not stop.is_set():
            base.append(await pool.request(raw, 60))

    workers = [asyncio.create_task(closed_loop()) for _ in range(32)]
    await asyncio.sleep(15)
    stop.set()
    await asyncio.gather(*workers)
    capacity = sum(a.status == 200 for a in base) / 15
    rate = 4 * capacity
    answers: list[Answer] = []
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        answers.append(await pool.request(raw, 60))

    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        due = started + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.create_task(one()))
        i += 1
    lag = time.perf_counter() - started - seconds
    await asyncio.gather(*tasks)
    pool.close()
    ok = [a for a in answers if a.status == 200]
    shed = [a for a in answers if a.status == 503]
    other: dict[str, int] = {}
    for a in answers:
        if a.status not in (200, 503):
            key = str(a.status) if a.status else a.error
            other[key] = other.get(key, 0) + 1
    retry = all("retry-after" in a.headers for a in shed)
    goodput = len(ok) / seconds
    held = not other and retry
    return Row(
        "overload",
        f"open loop at 4x capacity ({rate:.0f} req/s offered, {len(answers)} requests) for {seconds:.0f} s",
        held,
        f"capacity {capacity:.0f} img/s (closed loop, 32 keep-alive clients); goodput {goodput:.0f} img/s "
        f"= {goodput / capacity:.2f} x capacity; 503: {len(shed)} "
        f"(p50 {fmt_ms([a.seconds for a in shed], 0.5)}, p99 {fmt_ms([a.seconds for a in shed], 0.99)}, "
        f"all with Retry-After: {retry}); 200: p50 {fmt_ms([a.seconds for a in ok], 0.5)}, "
        f"p99 {fmt_ms([a.seconds for a in ok], 0.99)}; other answers: {other or 0}; generator lag {lag:.1f} s",
    )


# --- scenarios with a server of their own -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def own_server(**env: str) -> AsyncIterator[tuple[Target, subprocess.Popen[bytes]]]:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LUNGSERVE_")}
    # One process (its pid is signalled and measured), unless a row passes LUNGSERVE_WORKERS.
    environment.update({"LUNGSERVE_LOG_LEVEL": "WARNING", "LUNGSERVE_WORKERS": "1", **env})
    environment["PYTHONPATH"] = str(ROOT) + os.pathsep + environment.get("PYTHONPATH", "")
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below; quoted if start-up fails
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    target = Target(f"http://127.0.0.1:{port}")
    try:
        for _ in range(600):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the chaos server did not start: {log.read()[-500:]!r}")
            if (await target.call(get("/health/ready"), 2)).status == 200:
                break
            await asyncio.sleep(0.1)
        yield target, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


async def rows10_11_sigterm() -> list[Row]:
    """SIGTERM while admitted work outlasts the drain (1 s), with /predict-many, readiness polled."""
    async with own_server(
        LUNGSERVE_DRAIN_TIMEOUT_S="0.5", LUNGSERVE_SHUTDOWN_DELAY_S="1", LUNGSERVE_MAX_IN_FLIGHT_BATCHES="1"
    ) as (t, proc):
        body, ctype = form("files", [tile(i, 768) for i in range(8)])
        raw = post("/predict-many", body, ctype)
        ready: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def poll_ready() -> None:
            while not stop.is_set():
                a = await t.call(get("/health/ready"), 2)
                ready.append((time.perf_counter(), a.status))
                if a.status == 0:
                    return
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_ready())
        requests = [asyncio.create_task(t.call(raw, 120)) for _ in range(48)]
        for _ in range(600):  # until the queue is deep: more than delay + drain can finish
            if (await t.metrics()).get("lungserve_queue_depth", 0) >= 100:
                break
            await asyncio.sleep(0.05)
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*requests)
        code = await asyncio.to_thread(proc.wait, 120)
        stop.set()
        await poller
    statuses: dict[str, int] = {}
    for a in answers:
        key = f"{a.status} {a.code or ''}".strip() if a.status else f"no answer ({a.error})"
        statuses[key] = statuses.get(key, 0) + 1
    bare = sum(1 for a in answers if a.status >= 500 and not a.is_json) + sum(1 for a in answers if a.status == 0)
    after = [s for ts, s in ready if ts >= signalled]
    saw_503 = 503 in after
    first_503 = next((ts - signalled for ts, s in ready if ts >= signalled and s == 503), float("nan"))
    refused = next((ts - signalled for ts, s in ready if ts >= signalled and s == 0), float("nan"))
    return [
        Row(
            "10",
            "SIGTERM with 48 /predict-many of 8 (queue >= 100 images deep), 1 s delay + 0.5 s drain",
            bare == 0 and code == 0,
            f"answers: {statuses}; bare 500s or dropped: {bare}; exit status {code}",
        ),
        Row(
            "11",
            "/health/ready polled every 50 ms through that shutdown",
            saw_503 and refused > first_503,
            f"503 from {first_503:.2f} s after SIGTERM; connection refused from {refused:.2f} s",
        ),
    ]


async def row13_deadline_storm(seconds: float) -> Row:
    async with own_server(
        LUNGSERVE_REQUEST_DEADLINE_S="0.2",
        LUNGSERVE_QUEUE_LIMIT="32",
        LUNGSERVE_MAX_FILES_PER_REQUEST="32",
        LUNGSERVE_MAX_BATCH_SIZE="16",
    ) as (t, _):
        body, ctype = form("file", [tile(3, 768)])
        raw = post("/predict", body, ctype)
        stop = asyncio.Event()
        answers: list[Answer] = []

        async def client() -> None:
            while not stop.is_set():
                answers.append(await t.call(raw, 10))

        tasks = [asyncio.create_task(client()) for _ in range(32)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    by: dict[str, int] = {}
    for a in answers:
        by[f"{a.status} {a.code or ''}".strip()] = by.get(f"{a.status} {a.code or ''}".strip(), 0) + 1
    needless = by.get("503 overloaded", 0)
    return Row(
        "13",
        f"deadline storm: 0.2 s deadline, 32 clients = queue limit, {seconds:.0f} s",
        needless == 0,
        f"answers: {by}; needless 503s: {needless}",
    )


async def sigterm_under_load() -> Row:
    async with own_server(LUNGSERVE_SHUTDOWN_DELAY_S="1") as (t, proc):
        body, ctype = form("files", [tile(i) for i in range(8)])
        raw = post("/predict-many", body, ctype)
        answers: list[Answer] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                a = await t.call(raw, 60)
                answers.append(a)
                if a.status == 0:
                    return

        tasks = [asyncio.create_task(client()) for _ in range(16)]
        await asyncio.sleep(5)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 120)
        stop.set()
        await asyncio.gather(*tasks)
    answered = [a for a in answers if a.status]
    ok = sum(a.status == 200 for a in answered)
    shed = sum(a.status == 503 and a.code == "shutting_down" for a in answered)
    other = len(answered) - ok - shed
    refused = sum(a.error in ("ConnectionRefusedError",) for a in answers if not a.status)
    lost = sum(1 for a in answers if not a.status and a.error != "ConnectionRefusedError")
    return Row(
        "sigterm",
        "SIGTERM under load: 16 clients looping /predict-many of 8 tiles",
        other == 0 and lost == 0,
        f"{ok} answered 200, {shed} JSON 503 shutting_down, {other} other; after the listener closed "
        f"{refused} connections were refused (never admitted); admitted but unanswered: {lost}; exit {code}",
    )


# --- main -----------------------------------------------------------------------------------------

# --- round 2 (issue 22): files that cost more, or claim more, than they are ---------------------


async def _loop_predict_for(t: Target, seconds: float, n: int = 4) -> list[Answer]:
    stop = asyncio.Event()
    clients = asyncio.create_task(ordinary_clients(t, stop, n))
    await asyncio.sleep(seconds)
    stop.set()
    return await clients


async def row15_scan_bombs(t: Target, bombs: int, scans: int) -> Row:
    bomb = scan_bomb(7000, scans)
    body, ctype = form("file", [bomb])
    raw = post("/predict", body, ctype)
    baseline = await _loop_predict_for(t, 5.0)
    before = await t.rss_mib()
    stop = asyncio.Event()
    async with rss_sampler(t) as samples:
        clients = asyncio.create_task(ordinary_clients(t, stop, 4))
        started = time.perf_counter()
        answers = await asyncio.gather(*(t.call(raw, 120) for _ in range(bombs)))
        during_s = time.perf_counter() - started
        stop.set()
        during = await clients
    after = await settle_rss(t)
    ok_before = sum(a.status == 200 for a in baseline)
    ok_during = sum(a.status == 200 for a in during)
    statuses = [f"{a.status} {a.code or a.error}" for a in answers]
    refused = all(400 <= a.status < 500 for a in answers)
    held = refused and ok_during == len(during) and ok_during > 0
    return Row(
        "15",
        f"{bombs} progressive-JPEG scan bombs at once (7000x7000, {len(scan_starts(bomb))} scans, "
        f"{len(bomb) / 1024:.0f} kB) while 4 clients loop /predict",
        held,
        f"bombs: {statuses}, slowest {max(a.seconds for a in answers):.2f} s; ordinary clients: "
        f"{ok_before} answers 200 in the 5 s before, {ok_during}/{len(during)} 200 in the {during_s:.1f} s "
        f"of the bombs (p50 {fmt_ms([a.seconds for a in during], 0.5)}); "
        f"RSS before {before:.0f}, peak {max(samples, default=float('nan')):.0f}, 5 s after {after:.0f} MiB",
    )


async def row16_claimed_size(t: Target, side: int) -> Row:
    data = tiled_tiff_claiming(side, side)
    body, ctype = form("file", [data])
    before = await t.rss_mib()
    live: list[float] = []
    done = asyncio.Event()

    async def poll_live() -> None:
        while not done.is_set():
            live.append((await t.call(get("/health/live"), 120)).seconds)
            await asyncio.sleep(0.05)

    async with rss_sampler(t) as samples:
        poller = asyncio.create_task(poll_live())
        answer = await t.call(post("/analyze", body, ctype), 300)
        done.set()
        await poller
    after = await settle_rss(t)
    held = answer.status == 413 and answer.seconds < 5 and max(live, default=0) < 5
    return Row(
        "16",
        f"a {len(data)}-byte tiled TIFF claiming {side:,} x {side:,} px to /analyze",
        held,
        f"{answer.status} {answer.code} after {answer.seconds:.2f} s; "
        f"/health/live slowest {max(live, default=0):.2f} s; "
        f"RSS before {before:.0f}, peak {max(samples, default=float('nan')):.0f}, 5 s after {after:.0f} MiB",
    )


async def row17_truncated_progressive(t: Target) -> Row:
    rng = np.random.default_rng(4)
    small = progressive(Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)))
    large = progressive(Image.fromarray(rng.integers(0, 256, (1536, 1536, 3), dtype=np.uint8)))
    results: list[str] = []
    held = True
    for path, data in (("/predict", small), ("/analyze", large)):
        for name, cut in (
            ("after scan 1", cut_after_scans(data, 1)),
            ("mid-file", cut_at(data, 0.5)),
            ("in the last scan", cut_at(data, 0.97)),
        ):
            body, ctype = form("file", [cut])
            answer = await t.call(post(path, body, ctype))
            held &= (answer.status, answer.code) == (422, "invalid_image")
            results.append(f"{path} {name}: {answer.status} {answer.code}")
    return Row("17", "progressive JPEGs cut short and closed with EOI", held, ", ".join(results))


async def row18_deep_json(t: Target) -> Row:
    name = (await t.model())["manifest"]["name"]
    answer = await t.call(post(f"/v2/models/{name}/infer", nested_json(100_000), "application/json"))
    held = answer.status == 400 and answer.is_json
    return Row("18", "OIP infer with JSON nested 100,000 levels", held, f"{answer.status} {answer.body[:80]!r}")


async def row19_grey_fill_analyze(t: Target) -> Row:
    rng = np.random.default_rng(5)
    data = encode(Image.fromarray(rng.integers(0, 256, (1536, 1536, 3), dtype=np.uint8)), "JPEG", quality=90)
    cut = data[: len(data) // 3] + b"\xff\xd9"
    figures = []
    held = True
    for path in ("/predict", "/analyze"):
        body, ctype = form("file", [cut])
        answer = await t.call(post(path, body, ctype))
        held &= (answer.status, answer.code) == (422, "invalid_image")
        figures.append(f"{path}: {answer.status} {answer.code}")
    return Row("19", "a grey-filled (cut + EOI) baseline JPEG to /predict and /analyze", held, ", ".join(figures))


async def row20_forwarded_rotation() -> Row:
    env = {"LUNGSERVE_ADMIN_TOKEN": "chaos-secret", "LUNGSERVE_ADMIN_AUTH_FAILURES_PER_MINUTE": "10"}
    async with own_server(**env) as (t, _):
        statuses = []
        for i in range(30):
            raw = (
                f"POST /admin/reload HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.7.{i // 256}.{i % 256}\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            statuses.append((await t.call(raw)).status)
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    return Row(
        "20",
        "30 wrong admin tokens from loopback, each with a new X-Forwarded-For",
        statuses.count(401) == 10 and statuses[-1] == 429,
        f"statuses: {counts}",
    )


async def row21_security_headers(t: Target) -> Row:
    wanted = ("x-content-type-options", "x-frame-options", "content-security-policy", "referrer-policy")
    missing = {}
    for path in ("/", "/docs", "/redoc", "/predict"):
        answer = await t.call(get(path))
        missing[path] = [h for h in wanted if h not in answer.headers]
    held = not any(missing.values())
    return Row("21", "GET /, /docs, /redoc, /predict: security headers", held, f"missing: {missing}")


async def row22_full_spool_disk() -> Row:
    with tempfile.TemporaryDirectory() as mount:
        mounting = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount]
        done = await asyncio.to_thread(subprocess.run, mounting, capture_output=True)
        if done.returncode != 0:
            return Row("22", "an /analyze upload filling the spool disk", False, "cannot mount a tmpfs (needs root)")
        try:
            async with own_server(TMPDIR=mount) as (t, _):
                body, ctype = form("file", [TILE + os.urandom(12 * 2**20)])
                answer = await t.call(post("/analyze", body, ctype))
                small, ctype = form("file", [TILE])
                after = await t.call(post("/predict", small, ctype))
        finally:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", mount], check=False)
    held = (answer.status, answer.code) == (507, "insufficient_storage") and after.status == 200
    return Row(
        "22",
        "a 12 MiB /analyze upload with TMPDIR on an 8 MiB tmpfs",
        held,
        f"{answer.status} {answer.code}; then /predict: {after.status}",
    )


SCENARIOS = (
    "1-4", "5", "6", "7", "8", "9", "10-11", "12", "13", "14", "overload", "sigterm",
    "15", "16", "17", "18", "19", "20", "21", "22",
)  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    t = Target(args.url)
    wanted = set(args.only.split(",")) if args.only else set(SCENARIOS)
    rows: list[Row] = []
    info = await t.model()
    queue_limit = int(info["batching"]["queue_limit"])
    steps: list[tuple[str, Callable[[], Awaitable[Row | list[Row]]]]] = [
        ("1-4", lambda: single_requests(t)),
        ("5", lambda: row5_slow_uploads(t, min(queue_limit, args.trickles))),
        ("6", lambda: row6_slow_headers(t, args.slow_headers)),
        ("7", lambda: row7_huge_header(t, 100)),
        ("8", lambda: row8_pixel_bombs(t, 8)),
        ("9", lambda: row9_big_bodies(t, 8, 120)),
        ("10-11", rows10_11_sigterm),
        ("12", lambda: row12_connection_close(t)),
        ("13", lambda: row13_deadline_storm(10)),
        ("14", lambda: row14_disconnects(t, 96)),
        ("overload", lambda: overload(t, args.overload_s)),
        ("sigterm", sigterm_under_load),
        ("15", lambda: row15_scan_bombs(t, 2, args.bomb_scans)),
        ("16", lambda: row16_claimed_size(t, args.claimed_side)),
        ("17", lambda: row17_truncated_progressive(t)),
        ("18", lambda: row18_deep_json(t)),
        ("19", lambda: row19_grey_fill_analyze(t)),
        ("20", row20_forwarded_rotation),
        ("21", lambda: row21_security_headers(t)),
        ("22", row22_full_spool_disk),
    ]
    for name, step in steps:
        if name not in wanted:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            result = await step()
        except Exception as exc:  # one broken scenario must not hide the others' figures
            result = Row(name, "(the scenario itself failed)", False, f"{type(exc).__name__}: {exc}")
        rows.extend(result if isinstance(result, list) else [result])
    lines = ["| Row | What was sent | Outcome | Figures |", "|---|---|---|---|"]
    lines += [f"| {r.row} | {r.sent} | {'held' if r.held else '**FAILED**'} | {r.figures} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.table = table
    return 0 if all(r.held for r in rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running lungserve (loopback)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--trickles", type=int, default=256, help="row 5: slow uploads (capped at the queue limit)")
    p.add_argument("--slow-headers", type=int, default=1000, help="row 6: connections sending headers slowly")
    p.add_argument("--overload-s", type=float, default=60.0, help="duration of the 4x overload run")
    p.add_argument("--bomb-scans", type=int, default=4000, help="row 15: scans in each progressive-JPEG bomb")
    p.add_argument("--claimed-side", type=int, default=4_000_000, help="row 16: the side the tiny TIFF claims")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    status = asyncio.run(main(arguments))
    if arguments.out:
        Path(arguments.out).write_text(arguments.table + "\n")
    sys.exit(status)
