"""A raw-socket HTTP/1.1 client for hostile requests that httpx would refuse to send.

Bounded in time: every socket operation has a timeout, and a read ends at Content-Length,
at the peer's close, or at the timeout (which fails the caller's assertion, never hangs it).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs

TIMEOUT_S = 20.0


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool = False  # the server closed the connection after this response

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        try:
            data = self.json()
        except ValueError:
            return None
        error = data.get("error") if isinstance(data, dict) else None
        return error.get("code") if isinstance(error, dict) else None


@dataclass
class Multipart:
    """A multipart/form-data body built by hand (so it can also be built wrong)."""

    boundary: str = field(default_factory=lambda: uuid.uuid4().hex)
    parts: list[bytes] = field(default_factory=list)

    def add(
        self, name: str | None, data: bytes, filename: str | None = "x.bin", ctype: str = "image/jpeg"
    ) -> Multipart:
        disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
        disposition += f'; filename="{filename}"' if filename is not None else ""
        head = f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
        self.parts.append(head.encode() + data + b"\r\n")
        return self

    def body(self, *, close: bool = True, preamble: bytes = b"") -> bytes:
        return preamble + b"".join(self.parts) + (f"--{self.boundary}--\r\n".encode() if close else b"")

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"


def request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] | None = None,
    *,
    content_length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers or ()]
    if content_length and body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def connect(port: int, timeout: float = TIMEOUT_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def connect_via(pid: int, port: int, timeout: float = TIMEOUT_S) -> socket.socket:
    """A connection that process `pid` (one front of several) accepted. Each front has its own
    socket and the kernel picks one by address hash, so connect until that front has it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = connect(port, timeout)
        if _acceptor(sock.getsockname()[1], port, deadline) == pid:
            return sock
        sock.close()
    raise TimeoutError(f"no connection accepted by process {pid} within {timeout} s")


def _acceptor(client_port: int, port: int, deadline: float) -> int | None:
    """The pid of the process that accepted the connection from `client_port` (polled)."""
    while time.monotonic() < deadline:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr.port == port and conn.raddr and conn.raddr.port == client_port and conn.pid:
                return int(conn.pid)
        time.sleep(0.001)
    return None


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating a server that answered early and closed (the answer is still readable)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_response(sock: socket.socket, timeout: float = TIMEOUT_S) -> RawResponse:
    """One response from `sock` (status line, headers, Content-Length body)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = _recv(sock, deadline)
        if not chunk:
            raise ConnectionError(f"connection closed before a complete response head: {buffer[:200]!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = _recv(sock, deadline)
        if not chunk:
            break
        rest += chunk
    closed = headers.get("connection", "").lower() == "close"
    return RawResponse(status, headers, rest[:length], closed)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def exchange(port: int, data: bytes, timeout: float = TIMEOUT_S) -> RawResponse:
    with connect(port, timeout) as sock:
        send_all(sock, data)
        return read_response(sock, timeout)
