"""Parts of the fleet e2e test (test_fleet.py): real HAProxy and Prometheus processes on
loopback, configured from the files the project ships (deploy/haproxy/haproxy.cfg,
deploy/prometheus/*.yaml) with only addresses, ports and timings swapped for a test.

Every wait is bounded and ends on an observed event (a log line, a stats row, a query answer);
`poll` is bounded polling of an endpoint, never a sleep standing in for an event.
"""

from __future__ import annotations

import csv
import io
import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
RULE_FILES = (ROOT / "deploy" / "prometheus" / "recording.yaml", ROOT / "deploy" / "prometheus" / "alerts.yaml")

T = TypeVar("T")

_POLL_INTERVAL_S = 0.2


def poll(check: Callable[[], T | None], *, timeout_s: float, what: str) -> T:
    """Call `check` until it returns something other than None (or False); fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except (httpx.HTTPError, OSError) as exc:  # the endpoint is not up yet
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error!r})")
        time.sleep(_POLL_INTERVAL_S)  # the interval of a bounded poll, not a synchronisation


def render_haproxy_cfg(shipped: str, *, port: int, servers: Sequence[tuple[str, int]], stats_socket: Path) -> str:
    """The shipped config for loopback: our bind address, one `server` line per process instead of
    the DNS server-template, no Docker resolver, a stats socket, and faster health checks."""
    out: list[str] = []
    skipping_section = False
    for line in shipped.splitlines():
        stripped = line.strip()
        if skipping_section:
            if stripped and not line[0].isspace():
                skipping_section = False
            else:
                continue
        if stripped.startswith("resolvers "):
            skipping_section = True
            continue
        if stripped.startswith("log "):
            continue  # access log to stdout: not needed by the test
        if stripped == "global":
            out += [line, f"    stats socket {stats_socket} mode 600 level admin"]
            continue
        if stripped.startswith("bind "):
            out.append(f"    bind 127.0.0.1:{port}")
            continue
        if stripped.startswith("default-server "):
            out.append("    default-server check inter 250ms fastinter 250ms downinter 250ms fall 2 rise 2")
            continue
        if stripped.startswith("server-template "):
            out += [f"    server {name} 127.0.0.1:{p}" for name, p in servers]
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def haproxy_servers(stats_socket: Path) -> dict[str, str]:
    """Backend server name -> status (UP, DOWN, ...), from HAProxy's runtime API."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {str(r["svname"]): str(r["status"]) for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}


def render_rules(tmp: Path, *, for_: str) -> list[Path]:
    """The shipped rule files with every `for:` shortened (a test cannot wait a minute); the
    expressions, names and labels are the shipped ones."""
    rendered = []
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = for_
        out = tmp / path.name
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        rendered.append(out)
    return rendered


def prometheus_config(targets: Sequence[str], rule_files: Sequence[Path]) -> str:
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "lungserve",
                "static_configs": [{"targets": list(targets), "labels": {"accelerator": "cpu"}}],
            }
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


class PrometheusAPI:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/alerts", timeout=5)
        r.raise_for_status()
        alerts: list[dict[str, Any]] = r.json()["data"]["alerts"]
        return alerts

    def rule_names(self) -> set[str]:
        r = httpx.get(f"{self.url}/api/v1/rules", timeout=5)
        r.raise_for_status()
        return {rule["name"] for g in r.json()["data"]["groups"] for rule in g["rules"]}


_SAMPLE = re.compile(r"^lungserve_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)


def predictions_served(base_url: str) -> float:
    """Requests one instance answered on the prediction routes, from its own /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return sum(float(v) for labels, v in _SAMPLE.findall(text) if 'route="/predict' in labels)
