"""A real S3 endpoint for tests: a `moto_server` process on 127.0.0.1, plus small helpers.

Shared by tests/e2e (and any test that needs S3). The server is a separate process, so the
client under test talks HTTP to it exactly as it would to MinIO or AWS; nothing is patched.
Its request log (werkzeug, one line per request) is collected so tests can assert
which requests were made, e.g. that a cache hit downloads nothing. `LoggedProcess` does the
same for any child process (e.g. `lungserve serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
_RUNNING = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
_START_TIMEOUT_S = 60.0


class LoggedProcess:
    """A child process whose merged stdout/stderr is collected line by line, so tests can wait
    for a log line (an event) instead of sleeping."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        # Drain its output for the process's whole life: a full pipe would block its logging.
        self._reader = threading.Thread(target=self._read, name="child-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: re.Pattern[str] | str, *, start: int = 0, timeout_s: float = 30.0) -> str:
        """Block until a log line from index `start` on matches; fail if the process exits first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(regex.search(x) for x in self._lines[start:]) or self.proc.poll() is not None,
                timeout=timeout_s,
            )
            for line in self._lines[start:]:
                if regex.search(line):
                    return line
            tail = "\n".join(self._lines[-30:])
        reason = f"exited with {self.proc.returncode}" if ok else "timed out"
        raise RuntimeError(f"{self.proc.args!r} {reason} before logging {regex.pattern!r}; last lines:\n{tail}")

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def log_position(self) -> int:
        with self._cond:
            return len(self._lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class MotoServer(LoggedProcess):
    """`moto_server -H 127.0.0.1 -p 0`: the OS picks the port, read back from the startup line."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", "0"], env)
        match = _RUNNING.search(self.wait_for_line(_RUNNING, timeout_s=_START_TIMEOUT_S))
        assert match is not None
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def requests_since(self, start: int) -> list[str]:
        """Request lines logged since `start`, after making sure the log reader has caught up.

        werkzeug logs a request when its response starts, so every request a finished client
        call made is already in the pipe; a marker request logged after them proves the reader
        has consumed them all.
        """
        marker = uuid.uuid4().hex
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{self.url}/moto-api/sync-{marker}", timeout=10)
        self.wait_for_line(marker, start=start)
        with self._cond:
            lines = self._lines[start:]
        return [x for x in lines if '"' in x and marker not in x]


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[MotoServer]:
    server = MotoServer(env)
    try:
        yield server
    finally:
        server.stop()


def set_dummy_aws_env(monkeypatch: pytest.MonkeyPatch, *, key: str = "testing", secret: str = "testing") -> None:
    """Credentials through the standard chain (environment), isolated from the developer's ~/.aws
    and from the instance metadata service (traffic stays on loopback)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def boto3_client(service: str, endpoint_url: str, **kwargs: Any) -> Any:
    """A plain synchronous boto3 client for test set-up (seeding buckets, IAM users)."""
    import boto3  # type: ignore[import-untyped]  # no boto3-stubs in the lock; set-up only

    return boto3.client(service, endpoint_url=endpoint_url, region_name="us-east-1", **kwargs)


def refusing_socket() -> socket.socket:
    """A TCP port that is bound but not listening: every connection to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


class Gate:
    """An endpoint that refuses connections until `open()`, then relays them to `target_port`.

    The port is bound from the start and never released, so there is no window in which
    another process could take it: "refuses, then comes up" without any sleeps.
    """

    def __init__(self) -> None:
        self._sock = refusing_socket()
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._target = 0

    async def open(self, target_port: int) -> None:
        self._target = target_port
        self._server = await asyncio.start_server(self._relay, sock=self._sock)  # listen() happens here

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    async def close(self) -> None:
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        else:
            self._sock.close()
