"""A `lungserve serve` process of this tree for the benchmark scripts (not collected by pytest)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


@contextmanager
def server(model: str | None, settings: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """Start, wait for /health/ready, yield (url, pid); SIGTERM at the end. Settings: LUNGSERVE_* values."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGSERVE_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "LUNGSERVE_PROVIDER": "cpu",
            "LUNGSERVE_LOG_LEVEL": "WARNING",
            "LUNGSERVE_WORKERS": "1",  # one process: its pid is the server's memory
            **settings,
        }
    )
    if model:
        env["LUNGSERVE_MODEL_URI"] = model
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(url + "/health/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {READY_TIMEOUT_S} s; see {log}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
