"""A short headless Locust run (loadtest/locustfile.py) against a real `lungserve serve` on loopback.

It proves the load test and the server work together under concurrent load: every request
of a ~15 s run with 8 users (single and multi-image uploads of the synthetic image set)
must succeed. It asserts no timings: speed is measured by loadtest/bench.py.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"

READY_TIMEOUT_S = 60.0
LOCUST_RUN_TIME_S = 15
LOCUST_TIMEOUT_S = LOCUST_RUN_TIME_S + 45.0

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The caller's environment without LUNGSERVE_*/LOADTEST_* overrides: defaults are under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("LUNGSERVE_", "LOADTEST_", "LOCUST_"))}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """`lungserve serve` (bundled model, default settings) on a free loopback port, once ready."""
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode} before ready:\n{_tail(log_path)}")
                try:
                    if client.get(f"{url}/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready within {READY_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
                time.sleep(0.1)  # poll interval of the readiness endpoint, not a synchronisation
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_locust_headless_run_has_no_failures(server_url: str, tmp_path: Path) -> None:
    csv_prefix = tmp_path / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", "8", "-r", "8", "-t", f"{LOCUST_RUN_TIME_S}s", "--stop-timeout", "10",
        "--host", server_url, "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
    ]
    env = _clean_env()  # no LOADTEST_IMAGES: the locustfile's small synthetic image set
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S)
    output = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output

    with (tmp_path / "locust_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0, output
    assert int(total["Request Count"]) > 0, output
    # Both endpoints were exercised (default mix 3:1).
    assert int(rows["/predict"]["Request Count"]) > 0, output
    assert int(rows["/predict-many (n=8)"]["Request Count"]) > 0, output
    failures = (tmp_path / "locust_failures.csv").read_text().strip().splitlines()
    assert len(failures) <= 1, "\n".join(failures)  # the header only
