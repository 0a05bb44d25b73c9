"""A real `lungserve serve` for e2e tests: a free loopback port, the process, its readiness.

Every e2e test that needs one server starts it here (test_fleet.py runs a fleet of its own).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0
# LUNGSERVE_WORKERS defaults to the usable CPUs: every e2e server is one process unless its test
# is about the topology (it passes LUNGSERVE_WORKERS itself). The servers started elsewhere (S3
# reload, compose, fleet) add this too.
ONE_PROCESS = {"LUNGSERVE_WORKERS": "1"}


def lungserve_executable() -> Path:
    venv = ROOT / ".venv" / "bin" / "lungserve"
    return venv if venv.exists() else Path(sys.executable).parent / "lungserve"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp_path: Path, **env: str) -> AbstractContextManager[Server]:
    """This checkout's `lungserve serve`, in this environment less LUNGSERVE_*, plus env."""
    return run_server(tmp_path, lungserve_executable(), os.environ, env)


@contextmanager
def run_server(
    tmp_path: Path, executable: Path, environ: Mapping[str, str], env: Mapping[str, str]
) -> Iterator[Server]:
    """`executable serve` on a free loopback port, cwd tmp_path, in `environ` less LUNGSERVE_*, one
    process (LUNGSERVE_WORKERS=1), plus env."""
    port = free_port()
    environment = {k: v for k, v in environ.items() if not k.startswith("LUNGSERVE_")}
    # Slide jobs stay in the test's folder, never in the developer's state directory.
    environment["LUNGSERVE_JOBS_URI"] = str(tmp_path / "jobs")
    environment.update(ONE_PROCESS)
    environment.update(env)
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=tmp_path,  # the bundled model must be found from the package, not the cwd
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)


async def wait_ready(server: Server) -> None:
    """Poll /health/ready (the readiness event) with a bounded number of attempts."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(f"server exited with {server.proc.returncode}:\n{server.output()}")
            try:
                if (await client.get("/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.1)
    pytest.fail(f"server not ready within {READY_TIMEOUT_S} s:\n{server.output()}")
