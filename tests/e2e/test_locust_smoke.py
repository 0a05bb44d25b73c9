"""A short headless Locust run (loadtest/locustfile.py) against a real `lungserve serve` on loopback.

It proves the load test and the server work together under concurrent load: every request
of a ~15 s run with 8 users (single and multi-image uploads of the synthetic image set)
must succeed. It asserts no timings: speed is measured by loadtest/bench.py.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.server import EXIT_TIMEOUT_S, start_server, wait_ready

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"

LOCUST_RUN_TIME_S = 15
LOCUST_TIMEOUT_S = LOCUST_RUN_TIME_S + 45.0

pytestmark = pytest.mark.e2e


def _clean_env() -> dict[str, str]:
    """The caller's environment without LUNGSERVE_*/LOADTEST_* overrides: defaults are under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("LUNGSERVE_", "LOADTEST_", "LOCUST_"))}


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """`lungserve serve` (bundled model, default settings) on a free loopback port, once ready."""
    with start_server(tmp_path) as server:
        asyncio.run(wait_ready(server))
        yield server.url
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(EXIT_TIMEOUT_S)


def test_locust_headless_run_has_no_failures(server_url: str, tmp_path: Path) -> None:
    csv_prefix = tmp_path / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", "8", "-r", "8", "-t", f"{LOCUST_RUN_TIME_S}s", "--stop-timeout", "10",
        "--host", server_url, "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
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
