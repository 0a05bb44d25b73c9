"""A lungserve fleet on loopback, without containers: three real `lungserve serve` processes loading
their model from a real S3 endpoint (moto server), HAProxy (Debian package) in front with the
shipped deploy/haproxy/haproxy.cfg, a real Prometheus scraping all three with the shipped rule
files, and Locust driving load through HAProxy.

It proves, in one run (about a minute and a half):
1. One instance gets SIGTERM in the middle of the load: 0 failed requests at the client (HAProxy
   health-checks /health/ready, retries and redispatches; the instance drains what it admitted
   and exits 0).
2. Prometheus fires LungserveInstanceDown for exactly that instance (and clears it when the
   instance is back).
3. A new model version rolled out instance by instance (`lungserve upload`, then POST
   /admin/reload on each in turn) changes every answer's model.version, with 0 failed requests;
   an instance answers with the new version from the moment its reload returned.

No timing is asserted. Every wait ends on an event (a log line, a HAProxy stats row, a Prometheus
answer) and is bounded. Each Locust phase runs until the test has seen its events, then is stopped
(its final statistics count every request that completed; a request still in flight at that
moment is dropped by Locust, long after the events under test).

Without HAProxy's retries and redispatch (the lines removed from the rendered config), the
SIGTERM phase fails: 2-3 requests lost per run when this was tried.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.fleet import (
    HAPROXY_CFG,
    RULE_FILES,
    PrometheusAPI,
    haproxy_servers,
    poll,
    predictions_served,
    prometheus_config,
    render_haproxy_cfg,
    render_rules,
)
from tests.e2e.server import ONE_PROCESS, free_port
from tests.images import noise_png
from tests.s3fixtures import LoggedProcess, MotoServer
from tests.system_tools import require_tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = ROOT / "service" / "bundled_model"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
TOKEN = "fleet-admin-token"
NAMES = ("s0", "s1", "s2")
V1, V2 = "fleet-v1", "fleet-v2"
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")

STARTUP_TIMEOUT_S = 120.0
EVENT_TIMEOUT_S = 60.0
# Each Locust phase runs until the test has seen its events; this only bounds it.
LOCUST_MAX_RUN_S = 150
LOCUST_USERS = 4


@dataclass
class Instance:
    name: str
    proc: LoggedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Answer:
    started: float
    finished: float
    status: int
    version: str | None
    server: str | None


@dataclass
class VersionTracker:
    """Clients that keep asking /predict through HAProxy and record every answer's model version
    and the server HAProxy picked (its X-Lungserve-Server header)."""

    url: str
    image: bytes
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, clients: int = 2) -> None:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post("/predict", files={"file": ("tile.png", self.image, "image/png")})
                    status = r.status_code
                    version = r.json().get("model", {}).get("version") if status == 200 else None
                    server = r.headers.get("x-lungserve-server")
                except httpx.HTTPError:
                    status, version, server = 0, None, None
                with self._lock:
                    self.answers.append(Answer(started, time.monotonic(), status, version, server))

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


class LocustRun:
    """A headless Locust run (loadtest/locustfile.py) against HAProxy, in the background, until the
    test has seen its events and stops it (SIGTERM: Locust writes its final statistics and exits
    0 unless a request failed). `-t` is only an upper bound."""

    def __init__(self, host: str, out: Path) -> None:
        self.json_path = out.with_suffix(".json")  # Locust adds the suffix
        self.log_path = out.with_suffix(".log")
        cmd = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(LOCUST_USERS), "-r", str(LOCUST_USERS), "-t", f"{LOCUST_MAX_RUN_S}s",
            "--host", host, "--only-summary", "--json-file", str(out), "--loglevel", "WARNING",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def assert_running(self, what: str) -> None:
        assert self.proc.poll() is None, f"the load ended (upper bound {LOCUST_MAX_RUN_S} s) before {what}"

    def stop(self) -> tuple[int, int]:
        """Stop the load; (requests, failures) over every request that completed. A request still
        in flight at this moment is neither: Locust drops it."""
        self.assert_running("the test stopped it")
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        log = self.log_path.read_text(errors="replace")[-4000:]
        assert code == 0, f"locust exited with {code}:\n{log}"
        entries: list[dict[str, Any]] = json.loads(self.json_path.read_text())
        requests = sum(int(e["num_requests"]) for e in entries)
        failures = sum(int(e["num_failures"]) for e in entries)
        return requests, failures

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def model_dir(tmp: Path, version: str) -> Path:
    """The bundled (real) model under another version name: same ONNX file, new manifest."""
    out = tmp / version
    shutil.copytree(BUNDLED_MODEL, out)
    manifest = json.loads((out / "model.json").read_text())
    manifest["version"] = version
    (out / "model.json").write_text(json.dumps(manifest, indent=1))
    return out


def lungserve_upload(folder: Path, uri: str, endpoint: str) -> None:
    """`lungserve upload`, the command an operator runs."""
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "upload", str(folder), uri, "--endpoint-url", endpoint],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture
def processes() -> Iterator[list[LoggedProcess]]:
    """Every process the test starts; all stopped (SIGTERM, then SIGKILL) at the end."""
    started: list[LoggedProcess] = []
    yield started
    for proc in started:  # all at once: each server spends its shutdown delay in parallel
        if proc.proc.poll() is None:
            proc.proc.terminate()
    for proc in reversed(started):
        proc.stop()


def launch(name: str, port: int, env: dict[str, str], tmp: Path, processes: list[LoggedProcess]) -> LoggedProcess:
    argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = LoggedProcess(argv, env={**env, "LUNGSERVE_MODEL_CACHE_DIR": str(tmp / f"cache-{name}")}, cwd=ROOT)
    processes.append(proc)
    return proc


def listening(name: str, proc: LoggedProcess) -> Instance:
    match = _LISTENING.search(proc.wait_for_line(_LISTENING, timeout_s=STARTUP_TIMEOUT_S))
    assert match is not None
    return Instance(name, proc, int(match.group(1)))  # listening: its lifespan (load + warm-up) is done


def firing(prom: PrometheusAPI, alertname: str, instance: str) -> bool:
    return any(
        a["labels"].get("alertname") == alertname and a["labels"].get("instance") == instance and a["state"] == "firing"
        for a in prom.alerts()
    )


def test_fleet_survives_sigterm_alerts_and_rolls_out_a_model(
    moto: MotoServer, bucket: str, tmp_path: Path, processes: list[LoggedProcess]
) -> None:
    haproxy = require_tool("haproxy", "haproxy")
    prometheus = require_tool("prometheus", "prometheus")

    # --- the model, in S3, put there the way an operator does ---
    uri = f"s3://{bucket}/lung/"
    lungserve_upload(model_dir(tmp_path, V1), uri, moto.url)
    env = {
        "LUNGSERVE_MODEL_URI": uri,
        "LUNGSERVE_S3_ENDPOINT_URL": moto.url,
        "LUNGSERVE_ADMIN_TOKEN": TOKEN,
        "LUNGSERVE_PROVIDER": "cpu",
        "LUNGSERVE_MAX_BATCH_SIZE": "8",
        "LUNGSERVE_PREPROCESS_WORKERS": "1",
        "LUNGSERVE_MAX_IN_FLIGHT_BATCHES": "1",
        "LUNGSERVE_DRAIN_TIMEOUT_S": "10",
        **ONE_PROCESS,  # each instance one process: the fleet is HAProxy's three servers
    }
    launched = {n: launch(n, 0, env, tmp_path, processes) for n in NAMES}  # they load and warm up at once
    instances = {n: listening(n, proc) for n, proc in launched.items()}

    # --- HAProxy: the shipped config, on loopback ---
    stats = tmp_path / "haproxy.sock"
    lb_port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        render_haproxy_cfg(
            HAPROXY_CFG.read_text(), port=lb_port, servers=[(i.name, i.port) for i in instances.values()],
            stats_socket=stats,
        )
    )  # fmt: skip
    for directive in ("option httpchk GET /health/ready", "retries 3", "option redispatch 1", "retry-on "):
        assert directive in cfg.read_text(), directive  # the shipped behaviour survives the rendering
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    processes.append(LoggedProcess([haproxy, "-db", "-f", str(cfg)]))
    lb = f"http://127.0.0.1:{lb_port}"
    poll(lambda: stats.exists() and set(haproxy_servers(stats).values()) == {"UP"}, timeout_s=EVENT_TIMEOUT_S,
         what="HAProxy to see all three instances UP")  # fmt: skip

    # --- Prometheus: scrapes all three, loads the shipped rules (with `for:` shortened) ---
    prom_port = free_port()
    rules = render_rules(tmp_path, for_="1s")
    (tmp_path / "prometheus.yml").write_text(prometheus_config([i.target for i in instances.values()], rules))
    prom_proc = LoggedProcess([
        prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ])  # fmt: skip
    processes.append(prom_proc)
    prom_proc.wait_for_line("Server is ready to receive web requests", timeout_s=EVENT_TIMEOUT_S)
    prom = PrometheusAPI(f"http://127.0.0.1:{prom_port}")
    shipped_rules = {
        r.get("alert") or r.get("record") for p in RULE_FILES for g in _yaml(p)["groups"] for r in g["rules"]
    }
    assert shipped_rules <= prom.rule_names()
    poll(lambda: len(prom.query('up{job="lungserve"} == 1')) == 3, timeout_s=EVENT_TIMEOUT_S,
         what="Prometheus to scrape all three instances")  # fmt: skip

    # === 1. SIGTERM one instance in the middle of the load ===
    victim = instances["s0"]
    others = [instances["s1"], instances["s2"]]
    locust = LocustRun(lb, tmp_path / "locust-sigterm")
    try:
        poll(lambda: predictions_served(victim.url) >= 30, timeout_s=EVENT_TIMEOUT_S,
             what="load to reach s0 through HAProxy")  # fmt: skip
        locust.assert_running("the SIGTERM")
        victim.proc.proc.send_signal(signal.SIGTERM)
        assert victim.proc.wait_exit(timeout_s=EVENT_TIMEOUT_S) == 0, victim.proc.output()[-3000:]
        locust.assert_running("the instance had stopped")

        # HAProxy took it out of rotation (its health check on /health/ready failed).
        poll(lambda: haproxy_servers(stats)["s0"].startswith("DOWN"), timeout_s=EVENT_TIMEOUT_S,
             what="HAProxy to mark s0 DOWN")  # fmt: skip
        # Prometheus sees it: the shipped LungserveInstanceDown fires, for that instance only.
        poll(lambda: firing(prom, "LungserveInstanceDown", victim.target), timeout_s=EVENT_TIMEOUT_S,
             what="LungserveInstanceDown to fire for s0")  # fmt: skip
        assert not any(firing(prom, "LungserveInstanceDown", o.target) for o in others)
        # The load goes on, on the other two.
        served = {o.name: predictions_served(o.url) for o in others}
        poll(lambda: all(predictions_served(o.url) >= served[o.name] + 20 for o in others),
             timeout_s=EVENT_TIMEOUT_S, what="the other instances to keep serving")  # fmt: skip
        requests, failures = locust.stop()
    finally:
        locust.kill()
    assert failures == 0, f"{failures} of {requests} requests failed at the client"
    assert requests > 0
    print(f"SIGTERM phase: {requests} requests through HAProxy, {failures} failed")  # shown with -rP

    # s0 comes back on the address HAProxy knows; HAProxy and Prometheus see it again.
    instances["s0"] = listening("s0", launch("s0", victim.port, env, tmp_path, processes))
    poll(lambda: haproxy_servers(stats).get("s0") == "UP", timeout_s=EVENT_TIMEOUT_S, what="HAProxy to see s0 UP")
    poll(lambda: not firing(prom, "LungserveInstanceDown", victim.target), timeout_s=EVENT_TIMEOUT_S,
         what="LungserveInstanceDown to clear")  # fmt: skip

    # === 2. Roll a new model out, instance by instance, under load ===
    tracker = VersionTracker(lb, noise_png(96, 7))
    locust = LocustRun(lb, tmp_path / "locust-rollout")
    reloads: dict[str, tuple[float, float]] = {}
    try:
        tracker.start()
        poll(lambda: {a.server for a in tracker.snapshot() if a.version == V1} >= set(NAMES),
             timeout_s=EVENT_TIMEOUT_S, what="answers from every instance on the first model")  # fmt: skip
        lungserve_upload(model_dir(tmp_path, V2), uri, moto.url)
        for name in NAMES:
            began = time.monotonic()
            r = httpx.post(f"{instances[name].url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=120)  # fmt: skip
            reloads[name] = (began, time.monotonic())
            assert r.status_code == 200, r.text
            assert (r.json()["status"], r.json()["previous"]["version"], r.json()["current"]["version"]) == (
                "reloaded",
                V1,
                V2,
            )
        rolled_out = reloads[NAMES[-1]][1]
        poll(lambda: {a.server for a in tracker.snapshot() if a.started > rolled_out} >= set(NAMES),
             timeout_s=EVENT_TIMEOUT_S, what="answers from every instance after the roll-out")  # fmt: skip
        tracker.stop()
        requests, failures = locust.stop()
    finally:
        tracker.stop()
        locust.kill()
    assert failures == 0, f"{failures} of {requests} requests failed at the client during the roll-out"

    answers = tracker.snapshot()
    print(f"roll-out phase: {requests} Locust requests ({failures} failed), {len(answers)} tracked answers")
    assert [a for a in answers if a.status != 200] == []
    for a in answers:
        assert a.server in NAMES, a
        began, done = reloads[a.server]
        if a.finished < began:
            assert a.version == V1, a  # before its instance's reload
        elif a.started > done:
            assert a.version == V2, a  # every answer after its instance's reload
    after = [a for a in answers if a.started > rolled_out]
    assert after
    assert all(a.version == V2 for a in after)
    for inst in instances.values():
        assert httpx.get(f"{inst.url}/health/ready", timeout=5).json()["model"]["version"] == V2


def _yaml(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc
