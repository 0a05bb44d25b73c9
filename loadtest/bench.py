"""One-command benchmark: lungserve against its ablations and peers, same images, same load.

    .venv/bin/python loadtest/bench.py --out docs/benchmarks

Each system (lungserve, nobatch, inprocess, seed, bentoml, rayserve, mosec, litserve, triton) is
started alone on 127.0.0.1, warmed up, driven by wrk at each concurrency, measured and stopped;
the peers run from their own hashed virtual environments under --cache. Writes RESULTS.md,
results.json and the plots to --out; --quick is a smoke run. Method: docs/benchmarks/METHOD.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs; only used through a few calls

ROOT = Path(__file__).resolve().parents[1]
LOADTEST = ROOT / "loadtest"
PEERS = LOADTEST / "peers"
WRK_SCRIPT = LOADTEST / "wrk_multipart.lua"
BUNDLED_MODEL = ROOT / "service" / "bundled_model"
SHARED_DATA = Path(os.environ.get("LUNGSERVE_SHARED_DATA", ROOT.parent / "shared" / "data"))

ALL_SYSTEMS = (
    "lungserve",
    "nobatch",
    "inprocess",
    "mosec",
    "litserve",
    "triton",
    "bentoml",
    "rayserve",
    "seed",
    "ls-fronts",
    "ls-model",
)
SERVED = tuple(s for s in ALL_SYSTEMS if s != "inprocess")  # every system behind HTTP
# lungserve's multi-process topologies (docs/topology.md), one front per core: a model in each
# front, or one model process serving every front.
TOPOLOGIES = {
    "ls-fronts": {"LUNGSERVE_INFERENCE": "in-front"},
    "ls-model": {"LUNGSERVE_INFERENCE": "model-process"},
}
PEERS_OF_LUNGSERVE = ("mosec", "litserve", "triton", "bentoml", "rayserve", "seed")
LABELS = {
    "lungserve": "lungserve (batching on)",
    "ls-fronts": "lungserve, a front per core, model in each",
    "ls-model": "lungserve, a front per core + model process",
    "nobatch": "lungserve, batching off",
    "inprocess": "in-process ceiling",
    "seed": "seed design (Flask + Keras)",
    "bentoml": "BentoML",
    "rayserve": "Ray Serve",
    "mosec": "mosec",
    "litserve": "LitServe",
    "triton": "Triton (PyTriton)",
}
PEER_VENV = {
    "seed": "seed",
    "bentoml": "bentoml",
    "rayserve": "rayserve",
    "mosec": "mosec",
    "litserve": "litserve",
    "triton": "pytriton",
}
IMAGE_SETS = ("768", "224")
IMAGE_SET_LABELS = {"768": "768x768 originals", "224": "224x224 tiles"}
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
CORES = os.cpu_count() or 1


# --- results --------------------------------------------------------------------------------


@dataclass
class Level:
    system: str
    image_set: str
    concurrency: int
    seconds: float
    requests: int
    ok: int
    errors: dict[str, int]
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    peak_rss_mib: float
    server_cpu_share: float
    generator_cpu_share: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class Run:
    started: str
    command: str
    machine: dict[str, Any]
    config: dict[str, Any]
    levels: list[Level] = field(default_factory=list)
    inprocess: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    many: dict[str, Any] = field(default_factory=dict)
    finished: str = ""


# --- environment ----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pins(requirements: Path, names: Sequence[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() in names:
            pins[name.strip().lower()] = version.split()[0].rstrip("\\").strip()
    return pins


def machine_description() -> dict[str, Any]:
    import numpy
    import onnxruntime
    import PIL

    wrk = shutil.which("wrk")
    wrk_version = "not found"
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout + out.stderr).strip().splitlines()[0]
    return {
        "nproc": CORES,
        "cpu_model": _cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "wrk": wrk_version,
        "peers": {
            "bentoml": _pins(PEERS / "bentoml.txt", ["bentoml", "onnxruntime"]),
            "rayserve": _pins(PEERS / "rayserve.txt", ["ray", "onnxruntime"]),
            "seed": _pins(PEERS / "seed.txt", ["flask", "waitress", "tensorflow-cpu", "keras"]),
            "mosec": _pins(PEERS / "mosec.txt", ["mosec", "onnxruntime"]),
            "litserve": _pins(PEERS / "litserve.txt", ["litserve", "onnxruntime"]),
            "triton": _pins(PEERS / "pytriton.txt", ["nvidia-pytriton", "onnxruntime", "numpy"]),
        },
    }


def check_quiet(threshold: float, allow_busy: bool) -> float:
    """Refuse to measure on a machine that is already busy (other jobs skew every figure)."""
    procs = list(psutil.process_iter(["pid", "name"]))
    for p in procs:  # the first cpu_percent() of a process only starts its clock
        with suppress(psutil.Error):
            p.cpu_percent(None)
    busy = float(psutil.cpu_percent(interval=3.0))
    if busy > threshold:
        usage: list[tuple[float, int, str]] = []
        for p in procs:
            with suppress(psutil.Error):
                usage.append((float(p.cpu_percent(None)), int(p.info["pid"]), str(p.info["name"])))
        top = ", ".join(f"{name} (pid {pid}) {pct:.0f}%" for pct, pid, name in sorted(usage, reverse=True)[:5])
        msg = f"the machine is {busy:.0f}% busy before the run (threshold {threshold:.0f}%); top: {top}"
        if not allow_busy:
            raise SystemExit(f"bench: {msg}. Wait for it to be idle, or pass --allow-busy for a smoke run.")
        print(f"bench: WARNING {msg}", file=sys.stderr)
    return busy


def ensure_venv(name: str, cache: Path) -> Path:
    """A virtual environment from loadtest/peers/NAME.txt (pinned + hashed), rebuilt when it changes."""
    requirements = PEERS / f"{name}.txt"
    venv = cache / "venvs" / name
    python = venv / "bin" / "python"
    digest = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()
    stamp = venv / ".bench-stamp"
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"bench: creating {venv} from {requirements.relative_to(ROOT)} (once; cached)", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    uv = shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=600)
        subprocess.run(
            [
                uv,
                "pip",
                "install",
                "-q",
                "--python",
                str(python),
                "--require-hashes",
                "--no-deps",
                "-r",
                str(requirements),
            ],
            check=True,
            timeout=1800,
        )
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", str(requirements)],
            check=True,
            timeout=1800,
        )
    stamp.write_text(digest)
    return python


def pick_images(folder: Path, limit: int) -> list[Path]:
    """Up to `limit` JPEGs spread over the whole (class-sorted) folder."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not files:
        raise SystemExit(f"bench: no JPEG images under {folder} (see --images-768/--images-224)")
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env() -> dict[str, str]:
    """The caller's environment without settings that would change what is measured."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LUNGSERVE_", "BENCH_", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    env.update(
        {
            "BENTOML_DO_NOT_TRACK": "true",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    return env


# --- servers --------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    system: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    port: int
    path: str = "/predict"
    field: str = "file"  # multipart field, or "@oip:INPUT" for an OIP v2 binary body (wrk_multipart.lua)


def server_spec(
    system: str, cache: Path, lungserve_settings: dict[str, Any], lungserve_env: dict[str, str] | None = None
) -> ServerSpec:
    port = free_port()
    env = _base_env()
    max_batch = int(lungserve_settings["max_batch_size"])
    if system in ("lungserve", "nobatch", *TOPOLOGIES):
        env.update(lungserve_env or {})  # --lungserve-env: exploring settings, recorded in the report
        if system == "nobatch":
            env["LUNGSERVE_MAX_BATCH_SIZE"] = "1"
        if system in ("lungserve", "nobatch"):
            env["LUNGSERVE_WORKERS"] = "1"  # one process (the default is a front per usable CPU)
        if system in TOPOLOGIES:
            env["LUNGSERVE_WORKERS"] = str(len(os.sched_getaffinity(0)))
            env.update(TOPOLOGIES[system])
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return ServerSpec(system, cmd, env, ROOT, port)
    python = ensure_venv(PEER_VENV[system], cache)
    env["PYTHONPATH"] = str(ROOT)  # `service.model.preprocess` / `export.model` from this repository
    env["BENCH_ORT_INTRA_THREADS"] = "1"  # as lungserve on CPU: one thread per run, runs overlap
    delay_s = float(lungserve_settings["max_batch_delay_s"])
    if system == "mosec":
        env.update(
            {
                "BENCH_MODEL_DIR": str(BUNDLED_MODEL),
                "BENCH_MAX_BATCH_SIZE": str(max_batch),
                "BENCH_MAX_BATCH_DELAY_MS": str(delay_s * 1000),
            }
        )
        timeout_ms = int(float(lungserve_settings["request_deadline_s"]) * 1000)
        cmd = [
            str(python),
            str(PEERS / "mosec_app.py"),
            "--address",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            str(timeout_ms),
        ]
        return ServerSpec(system, cmd, env, PEERS, port)
    if system == "litserve":
        cmd = [
            str(python),
            str(PEERS / "litserve_app.py"),
            "--model",
            str(BUNDLED_MODEL),
            "--port",
            str(port),
            "--max-batch-size",
            str(max_batch),
            "--batch-timeout-s",
            str(delay_s),
            "--workers",
            str(CORES),
        ]
        return ServerSpec(system, cmd, env, PEERS, port)
    if system == "triton":
        home = cache / "pytriton_home"
        home.mkdir(parents=True, exist_ok=True)
        libdir = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        # The interpreter's own libpython first, or Triton's Python stub loads the system one.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PYTRITON_HOME"] = str(home)
        cmd = [
            str(python),
            str(PEERS / "pytriton_app.py"),
            "--model",
            str(BUNDLED_MODEL),
            "--port",
            str(port),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--max-batch-size",
            str(max_batch),
            "--max-queue-delay-us",
            str(int(delay_s * 1e6)),
        ]
        return ServerSpec(system, cmd, env, PEERS, port, path="/v2/models/lung/infer", field="@oip:image")
    if system == "bentoml":
        home = cache / "bentoml_home"
        home.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                "BENTOML_HOME": str(home),
                "BENCH_MODEL_DIR": str(BUNDLED_MODEL),
                "BENCH_MAX_BATCH_SIZE": str(max_batch),
                # BentoML's max_latency_ms is a budget beyond which it sheds requests (503):
                # lungserve's counterpart is its request deadline.
                "BENCH_MAX_LATENCY_MS": str(int(float(lungserve_settings["request_deadline_s"]) * 1000)),
            }
        )
        cmd = [
            str(python.parent / "bentoml"),
            "serve",
            "bentoml_service:LungBento",
            "--working-dir",
            str(PEERS),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        return ServerSpec(system, cmd, env, PEERS, port)
    if system == "rayserve":
        env.update(
            {
                # Ray turns a loopback node address into the machine's routable one unless it is in
                # single-machine mode (this switch): keeps all of Ray's own traffic on 127.0.0.1.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "disabled",  # loopback only; no token written to ~/.ray
            }
        )
        cmd = [
            str(python),
            str(PEERS / "rayserve_app.py"),
            "--model",
            str(BUNDLED_MODEL),
            "--port",
            str(port),
            "--max-batch-size",
            str(max_batch),
            "--batch-wait-timeout-s",
            str(lungserve_settings["max_batch_delay_s"]),
            "--max-ongoing-requests",
            str(lungserve_settings["queue_limit"]),
            "--num-cpus",
            str(CORES),
        ]
        return ServerSpec(system, cmd, env, PEERS, port)
    if system == "seed":
        size = json.loads((BUNDLED_MODEL / "model.json").read_text())["input_size"]
        cmd = [str(python), str(PEERS / "seed_app.py"), "--port", str(port), "--input-size", str(size)]
        return ServerSpec(system, cmd, env, PEERS, port)
    raise ValueError(system)


def oip_binary_request(input_name: str, image: bytes) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol v2 request with the binary data extension: one BYTES element."""
    element = len(image).to_bytes(4, "little") + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        }
    ).encode()
    return header + element, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


class Server:
    """A server process in its own session; stopped by SIGTERM, then its whole tree by pid."""

    def __init__(self, spec: ServerSpec, log: TextIO) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            spec.cmd, cwd=spec.cwd, env=spec.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.root = psutil.Process(self.proc.pid)
        self.known: dict[int, float] = {}  # pid -> create_time of every process seen in the tree

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def tree(self) -> list[Any]:
        procs = [self.root]
        with suppress(psutil.Error):
            procs += self.root.children(recursive=True)
        for p in procs:
            with suppress(psutil.Error):
                self.known.setdefault(p.pid, p.create_time())
        return procs

    def wait_ready(self, sample: Path, deadline_s: float = READY_TIMEOUT_S) -> float:
        """Poll with a real prediction until one answers 200; returns the seconds it took."""
        t0 = time.monotonic()
        body = sample.read_bytes()
        oip_input = self.spec.field.removeprefix("@oip:") if self.spec.field.startswith("@oip:") else None
        with httpx.Client(timeout=30.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.spec.system} exited with {self.proc.returncode} during start-up")
                try:
                    if oip_input is not None:
                        content, headers = oip_binary_request(oip_input, body)
                        r = client.post(self.url + self.spec.path, content=content, headers=headers)
                        marker = '"outputs"'
                    else:
                        files = {self.spec.field: (sample.name, body, "image/jpeg")}
                        r = client.post(self.url + self.spec.path, files=files)
                        marker = '"label"'
                    if r.status_code == 200 and marker in r.text:
                        self.tree()
                        return time.monotonic() - t0
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > deadline_s:
                    raise RuntimeError(f"{self.spec.system} not ready within {deadline_s:.0f} s")
                time.sleep(0.25)

    def stop(self) -> None:
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # Ray and BentoML leave helpers behind when their parent goes: end exactly the
        # processes this server started (same pid *and* start time), nothing else.
        deadline = time.monotonic() + 15
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, created in self.known.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        p.send_signal(sig)
                except psutil.Error:
                    pass
            while time.monotonic() < deadline and self._alive():
                time.sleep(0.2)
            if not self._alive():
                return
            deadline = time.monotonic() + 5

    def _alive(self) -> bool:
        for pid, created in self.known.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                pass
        return False


class TreeSampler:
    """Samples the server tree's total RSS (peak) and CPU time while a level is measured."""

    def __init__(self, server: Server, interval: float = 0.2) -> None:
        self.server = server
        self.interval = interval
        self.peak_rss = 0
        self.cpu_start: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = 0
        for p in self.server.tree():
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu = t.user + t.system
            except psutil.Error:
                continue
            self.cpu_start.setdefault(p.pid, cpu)
            self.cpu_last[p.pid] = cpu
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_last[pid] - self.cpu_start[pid] for pid in self.cpu_last)


# --- load generator -------------------------------------------------------------------------


@dataclass
class WrkResult:
    data: dict[str, Any]
    cpu_seconds: float
    wall_seconds: float


def run_wrk(
    url: str, path: str, concurrency: int, seconds: int, files: Sequence[Path], field: str = "file"
) -> WrkResult:
    """One bounded wrk run; its CPU time comes from the kernel's rusage of the child."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench: wrk not found; install it (Debian/Ubuntu: apt-get install -y wrk)")
    cmd = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "60s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        path,
        field,
        *map(str, files),
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(seconds + 90, proc.kill)  # wrk stops itself; this is the backstop
    timer.start()
    try:
        stdout = proc.stdout.read() if proc.stdout else b""
        stderr = proc.stderr.read() if proc.stderr else b""
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
    wall = time.monotonic() - t0
    line = next((ln for ln in stdout.decode().splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout.decode()[-2000:]} {stderr.decode()[-2000:]}")
    return WrkResult(json.loads(line.removeprefix("WRK_JSON ")), rusage.ru_utime + rusage.ru_stime, wall)


def measure_level(
    server: Server,
    system: str,
    image_set: str,
    concurrency: int,
    files: Sequence[Path],
    warmup: int,
    duration: int,
) -> Level:
    if warmup > 0:
        run_wrk(server.url, server.spec.path, concurrency, warmup, files, server.spec.field)
    with TreeSampler(server) as sampler:
        res = run_wrk(server.url, server.spec.path, concurrency, duration, files, server.spec.field)
    d = res.data
    seconds = d["duration_us"] / 1e6
    errors = dict(d["errors"])
    errors["bad_body"] = int(d["bad_bodies"])
    ok = int(d["ok_bodies"])
    lat = d["latency_us"]
    return Level(
        system=system,
        image_set=image_set,
        concurrency=concurrency,
        seconds=seconds,
        requests=int(d["requests"]),
        ok=ok,
        errors=errors,
        images_per_s=ok / seconds,
        p50_ms=lat["p50"] / 1e3,
        p95_ms=lat["p95"] / 1e3,
        p99_ms=lat["p99"] / 1e3,
        max_ms=lat["max"] / 1e3,
        peak_rss_mib=sampler.peak_rss / 2**20,
        server_cpu_share=sampler.cpu_seconds / seconds / CORES,
        generator_cpu_share=res.cpu_seconds / res.wall_seconds / CORES,
    )


# --- systems --------------------------------------------------------------------------------


@contextmanager
def started(spec: ServerSpec, log_path: Path) -> Iterator[Server]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        server = Server(spec, log)
        try:
            yield server
        finally:
            server.stop()


def bench_served(
    system: str,
    run: Run,
    sets: dict[str, list[Path]],
    levels: Sequence[int],
    warmup: int,
    duration: int,
    cache: Path,
    lungserve_settings: dict[str, Any],
    lungserve_env: dict[str, str],
    levels_small: Sequence[int] = (),
) -> None:
    spec = server_spec(system, cache, lungserve_settings, lungserve_env)
    log_path = cache / "logs" / f"{system}.log"
    print(f"bench: {system}: starting on {spec.port} (log: {log_path})", flush=True)
    with started(spec, log_path) as server:
        ready_s = server.wait_ready(sets["768"][0])
        tree = [p for p in server.tree() if p.is_running()]
        idle_rss = sum(p.memory_info().rss for p in tree) / 2**20
        run.servers[system] = {
            "ready_seconds": ready_s,
            "idle_rss_mib": idle_rss,
            "processes": len(tree),  # the server's whole tree: workers, front ends, helpers
            "port": spec.port,
            "command": _portable(spec.cmd),
        }
        print(f"bench: {system}: ready in {ready_s:.1f} s, {idle_rss:.0f} MiB", flush=True)
        for image_set, files in sets.items():
            for c in levels if image_set == "768" else levels_small:
                level = measure_level(server, system, image_set, c, files, warmup, duration)
                run.levels.append(level)
                print(
                    f"bench: {system:9s} {image_set} c={c:<3d} {level.images_per_s:8.1f} img/s  "
                    f"p50 {level.p50_ms:8.1f}  p99 {level.p99_ms:8.1f} ms  err {level.error_count}  "
                    f"rss {level.peak_rss_mib:6.0f} MiB  server cpu {level.server_cpu_share:4.0%}  "
                    f"wrk cpu {level.generator_cpu_share:4.1%}",
                    flush=True,
                )
        if system == "lungserve":
            many = sets.get("224") or sets["768"]
            run.many = {"images": len(many), "served_median_s": time_predict_many(server.url, many)}
            print(
                f"bench: lungserve /predict-many of {len(many)}: {run.many['served_median_s'] * 1e3:.0f} ms", flush=True
            )


def _portable(cmd: Sequence[str]) -> str:
    """A server command as the report shows it: no path of the machine it ran on."""
    return " ".join(
        "python" if part == sys.executable else part.replace(f"{ROOT}/", "").replace(str(ROOT), ".") for part in cmd
    )


def time_predict_many(url: str, files: Sequence[Path], repeats: int = 5) -> float:
    """Median wall seconds of one `/predict-many` holding every file, after one warm-up call."""
    body = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    times: list[float] = []
    with httpx.Client(timeout=120.0) as client:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            r = client.post(url + "/predict-many", files=body)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200 or any("label" not in x for x in r.json()["results"]):
                raise RuntimeError(f"/predict-many failed: {r.status_code} {r.text[:500]}")
            if i:
                times.append(elapsed)
    return sorted(times)[len(times) // 2]


def bench_inprocess(run: Run, sets: dict[str, list[Path]], warmup: int, duration: int, max_batch: int = 16) -> None:
    for image_set, files in sets.items():
        cmd = [
            sys.executable,
            str(LOADTEST / "inprocess.py"),
            "--model",
            str(BUNDLED_MODEL),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--max-batch",
            str(max_batch),
            *map(str, files),
        ]
        out = subprocess.run(
            cmd, cwd=ROOT, env=_base_env(), capture_output=True, text=True, timeout=8 * (duration + warmup) + 120
        )
        if out.returncode != 0:
            raise RuntimeError(f"inprocess failed: {out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        run.inprocess[image_set] = res
        print(
            f"bench: inprocess {image_set}: ceiling {res['ceiling_images_per_s']:.1f} img/s "
            f"({res['ceiling_variant']}); single image p50 {res['single']['p50_ms']:.2f} ms "
            f"(decode {res['single']['decode_p50_ms']:.2f}, infer {res['single']['infer_p50_ms']:.2f})",
            flush=True,
        )


# --- report ---------------------------------------------------------------------------------


def _find(run: Run, system: str, image_set: str, c: int) -> Level | None:
    return next((lv for lv in run.levels if (lv.system, lv.image_set, lv.concurrency) == (system, image_set, c)), None)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def _cpu_ms_per_image(lv: Level, run: Run) -> str:
    """The server tree's CPU time per answered image: comparable even when the machine is shared."""
    if lv.images_per_s <= 0:
        return "n/a"
    return f"{lv.server_cpu_share * int(run.machine['nproc']) * 1000 / lv.images_per_s:.2f}"


def _ms(v: float) -> str:
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def goals(run: Run, levels: Sequence[int]) -> list[tuple[str, str, str, str]]:
    """Issue 13's goals as (goal, target, measured, verdict) rows; 'n/a' where the run lacks a figure."""
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    def row(goal: str, target: str, measured: str | None, ok: bool | None) -> None:
        rows.append((goal, target, measured if measured is not None else "n/a", verdict(ok)))

    inproc = run.inprocess.get("768")
    for c in (32, 128):
        ls = _find(run, "lungserve", "768", c)
        r = ls.images_per_s / inproc["ceiling_images_per_s"] if ls and inproc else None
        row(
            f"served / in-process ceiling (768, c={c})",
            ">= 0.9x",
            f"{r:.2f}x" if r is not None else None,
            None if r is None else r >= 0.9,
        )
    c = 32 if 32 in levels else max(levels)
    ls = _find(run, "lungserve", "768", c)
    for peer, target in (
        ("mosec", 1.2),
        ("litserve", 1.5),
        ("triton", 2.0),
        ("bentoml", 2.0),
        ("rayserve", 2.0),
        ("seed", 20.0),
    ):
        other = _find(run, peer, "768", c)
        r = ls.images_per_s / other.images_per_s if ls and other and other.images_per_s > 0 else None
        row(
            f"throughput vs {LABELS[peer]} (768, c={c})",
            f">= {target:g}x",
            f"{r:.2f}x" if r is not None else None,
            None if r is None else r >= target,
        )
    for lc in levels:
        mine = _find(run, "lungserve", "768", lc)
        peers = [
            lv for p in PEERS_OF_LUNGSERVE if (lv := _find(run, p, "768", lc)) and lv.error_count == 0 and lv.ok > 0
        ]
        best = min(peers, key=lambda lv: lv.p99_ms) if peers else None
        if mine and best:
            row(
                f"p99 vs the best peer's (768, c={lc})",
                f"<= {_ms(best.p99_ms)} ms ({LABELS[best.system]})",
                f"{_ms(mine.p99_ms)} ms",
                mine.p99_ms <= best.p99_ms,
            )
    c1 = _find(run, "lungserve", "768", 1)
    if c1 and inproc:
        bound = float(inproc["single"]["p50_ms"]) + 1.5
        row(
            "p99 at c=1 vs in-process single-image p50 + 1.5 ms (768)",
            f"<= {bound:.2f} ms",
            f"{c1.p99_ms:.2f} ms",
            c1.p99_ms <= bound,
        )
    else:
        row("p99 at c=1 vs in-process single-image p50 + 1.5 ms (768)", "", None, None)
    mine_all = [lv for lv in run.levels if lv.system == "lungserve"]
    if mine_all:
        peak = max(mine_all, key=lambda lv: lv.peak_rss_mib)
        row(
            "peak RSS across every level",
            "<= 150 MiB",
            f"{peak.peak_rss_mib:.0f} MiB ({peak.image_set}, c={peak.concurrency})",
            peak.peak_rss_mib <= 150,
        )
    seed_peak = max((lv.peak_rss_mib for lv in run.levels if lv.system == "seed"), default=None)
    if seed_peak and mine_all:
        ls_peak = max(lv.peak_rss_mib for lv in mine_all)
        row(
            "peak RSS vs seed design",
            "<= 0.25x",
            f"{ls_peak:.0f} / {seed_peak:.0f} MiB = {ls_peak / seed_peak:.2f}x",
            ls_peak / seed_peak <= 0.25,
        )
    m32, m128 = _find(run, "lungserve", "768", 32), _find(run, "lungserve", "768", 128)
    if m32 and m128:
        change = m128.peak_rss_mib / m32.peak_rss_mib - 1
        row(
            "peak RSS flat from c=32 to c=128 (768)",
            "within +-5%",
            f"{m32.peak_rss_mib:.0f} -> {m128.peak_rss_mib:.0f} MiB ({change:+.1%})",
            abs(change) <= 0.05,
        )
    else:
        row("peak RSS flat from c=32 to c=128 (768)", "within +-5%", None, None)
    many = run.many
    if many:
        r = many["served_median_s"] / many["inprocess_median_s"]
        row(
            f"/predict-many of {many['images']} vs in-process time for the same {many['images']}",
            "<= 1.1x",
            f"{many['served_median_s'] * 1e3:.0f} / {many['inprocess_median_s'] * 1e3:.0f} ms = {r:.2f}x",
            r <= 1.1,
        )
    else:
        row("/predict-many of 64 vs in-process time for the same 64", "<= 1.1x", None, None)
    return rows


def cpu_efficiency(run: Run, c: int = 32) -> list[str]:
    """The same comparison per CPU second: each system's server CPU time per image against lungserve's.

    On a shared machine the systems run one after the other under different background load,
    and multi-process servers take a larger share of a contended CPU; CPU time per image is the
    figure least moved by either.
    """
    mine = _find(run, "lungserve", "768", c)
    if mine is None or mine.images_per_s <= 0:
        return []
    mine_ms = mine.server_cpu_share * int(run.machine["nproc"]) * 1000 / mine.images_per_s
    rows = [
        f"Per CPU second (c={c}, 768 originals; server CPU ms per image, and that of each peer ÷ lungserve's, "
        "so above 1.00x lungserve spends less CPU per image):",
        "",
        "| system | CPU ms per image | ÷ lungserve |",
        "|---|---:|---:|",
        f"| {LABELS['lungserve']} | {mine_ms:.2f} | 1.00x |",
    ]
    for peer in ("nobatch", *TOPOLOGIES, *PEERS_OF_LUNGSERVE):
        lv = _find(run, peer, "768", c)
        if lv is None or lv.images_per_s <= 0:
            continue
        ms = lv.server_cpu_share * int(run.machine["nproc"]) * 1000 / lv.images_per_s
        rows.append(f"| {LABELS[peer]} | {ms:.2f} | {ms / mine_ms:.2f}x |")
    return rows


def write_markdown(run: Run, out: Path, levels: Sequence[int]) -> None:
    m = run.machine
    cfg = run.config
    lines: list[str] = [
        "# lungserve benchmark",
        "",
        "Generated by `loadtest/bench.py`; do not edit by hand (rerun it). "
        "Every figure below comes from one run on one machine.",
        "",
        f"- **Command:** `{run.command}`",
        *([f"- **Note:** {cfg['note']}"] if cfg.get("note") else []),
        f"- **Date (UTC):** {run.started} to {run.finished}",
        f"- **Machine:** {m['nproc']} CPU cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
        f"CPU busy before the run: {cfg['busy_before_percent']:.0f}%",
        f"- **Software:** Python {m['python']}, ONNX Runtime {m['onnxruntime']}, Pillow {m['pillow']}, "
        f"NumPy {m['numpy']}; peers: BentoML {m['peers']['bentoml'].get('bentoml', '?')}, "
        f"Ray {m['peers']['rayserve'].get('ray', '?')}, TensorFlow {m['peers']['seed'].get('tensorflow-cpu', '?')} "
        f"+ Keras {m['peers']['seed'].get('keras', '?')}, Flask {m['peers']['seed'].get('flask', '?')}, "
        f"waitress {m['peers']['seed'].get('waitress', '?')}, mosec {m['peers']['mosec'].get('mosec', '?')}, "
        f"LitServe {m['peers']['litserve'].get('litserve', '?')}, "
        f"PyTriton {m['peers']['triton'].get('nvidia-pytriton', '?')} (NumPy {m['peers']['triton'].get('numpy', '?')});"
        f" load generator {m['wrk']}",
        f"- **Load:** closed loop, concurrency {', '.join(map(str, levels))}; per level {cfg['warmup_s']} s "
        f"warm-up then {cfg['duration_s']} s measured; `POST /predict` with one image (multipart field "
        f"`file`), rotating over the image set; wrk with one thread (`loadtest/wrk_multipart.lua`). "
        "An answer counts only if it is 2xx with a label in its body.",
        "- **Images:** "
        + "; ".join(f"{IMAGE_SET_LABELS[k]}: {v['count']} files from `{v['folder']}`" for k, v in cfg["images"].items())
        + f". The model's input is {cfg['input_size']} px.",
        f"- **lungserve settings:** {cfg['lungserve_settings']}"
        + (f"; overridden for this run: {cfg['lungserve_env']}" if cfg.get("lungserve_env") else " (defaults)"),
        "",
        "Memory is the peak of the summed RSS of the server's whole process tree (sampled every 0.2 s; "
        "shared pages count once per process). CPU columns are shares of the whole machine "
        f"({m['nproc']} cores = 100%) over the measured window.",
        "",
    ]
    if run.inprocess:
        lines += [
            "## In-process ceiling (no HTTP)",
            "",
            "| images | ceiling images/s | variant | pool of 2, single images | 2 decoders + batches of max_batch_size "
            "| single image p50 / p99 (ms) | of which decode / inference p50 (ms) "
            "| physical bound images/s (cores ÷ CPU ms of decode + batched inference) |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for image_set, ip in run.inprocess.items():
            v = ip["variants"]
            s = ip["single"]
            pb = ip.get("physical_bound", {})
            bound = (
                (
                    f"{pb['images_per_s']:.0f} ({pb['cores']} ÷ ({pb['decode_cpu_ms']:.2f} + "
                    f"{pb['infer_cpu_ms']:.2f}) ms)"
                )
                if pb
                else "n/a"
            )
            lines.append(
                f"| {IMAGE_SET_LABELS[image_set]} | {ip['ceiling_images_per_s']:.1f} | {ip['ceiling_variant']} | "
                f"{v['pool2-single']['images_per_s']:.1f} | {v['pool2-decode-batch']['images_per_s']:.1f} | "
                f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {s['decode_p50_ms']:.2f} / {s['infer_p50_ms']:.2f} | "
                f"{bound} |"
            )
        lines.append("")
    for image_set in IMAGE_SETS:
        rows = [lv for lv in run.levels if lv.image_set == image_set]
        if not rows:
            continue
        ceiling = run.inprocess.get(image_set, {}).get("ceiling_images_per_s")
        lines += [
            f"## Served `/predict`, {IMAGE_SET_LABELS[image_set]}",
            "",
            "| system | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | peak RSS MiB "
            "| server CPU | server CPU ms per image | wrk CPU | lungserve images/s ÷ this | this ÷ ceiling |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for system in SERVED:
            for c in sorted({lv.concurrency for lv in rows}):
                lv = _find(run, system, image_set, c)
                if lv is None:
                    continue
                ls = _find(run, "lungserve", image_set, c)
                lines.append(
                    f"| {LABELS[system]} | {c} | {lv.images_per_s:,.1f} | {_ms(lv.p50_ms)} | {_ms(lv.p95_ms)} | "
                    f"{_ms(lv.p99_ms)} | {lv.error_count} | {lv.peak_rss_mib:,.0f} | {lv.server_cpu_share:.0%} | "
                    f"{_cpu_ms_per_image(lv, run)} | "
                    f"{lv.generator_cpu_share:.1%} | {_ratio(ls.images_per_s if ls else None, lv.images_per_s)} | "
                    f"{_ratio(lv.images_per_s, ceiling)} |"
                )
        lines.append("")
    lines += [
        "## Goals",
        "",
        "Issue 13's goals (at c=32 on the 768x768 originals unless stated), from this run's figures side by side.",
        "",
        "| goal | target | measured | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {g} | {t} | {v} | {ok} |" for g, t, v, ok in goals(run, levels)]
    lines += ["", *cpu_efficiency(run)]
    gen = [lv.generator_cpu_share for lv in run.levels]
    if gen:
        lines += [
            "",
            f"Load generator (wrk) CPU share of the machine: mean {sum(gen) / len(gen):.1%}, "
            f"max {max(gen):.1%} over {len(gen)} measured levels.",
        ]
    if run.servers:
        lines += [
            "",
            "## Start-up",
            "",
            "| system | processes | ready after (s) | idle RSS MiB |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {LABELS[s]} | {v.get('processes', '?')} | {v['ready_seconds']:.1f} | {v['idle_rss_mib']:.0f} |"
            for s, v in run.servers.items()
        ]
    lines += [
        "",
        "## How each system was set up",
        "",
        "- **lungserve**: `python -m service.cli serve --host 127.0.0.1 --port PORT` with default settings "
        "(batching off: `LUNGSERVE_MAX_BATCH_SIZE=1`).",
        "- **in-process ceiling** (`loadtest/inprocess.py`): `service.model.preprocess.load_image` + ORT "
        "`session.run`, no HTTP; the best of a pool of 2 threads on single images (1 intra-op thread each) and "
        "2 decode threads feeding batches of up to max_batch_size. Single-image latency: one thread, one image "
        "at a time, ORT default threads.",
        "- **seed design** (`loadtest/peers/seed_app.py`): Flask + waitress (defaults, 4 threads), full Pillow "
        "decode (no JPEG draft), convert, resize to the model's input size (the original resized to 256 px), "
        "Keras 3 `model.predict` once per request on `export.model.build_model` (random weights).",
        "- **BentoML** (`loadtest/peers/bentoml_service.py`): `bentoml serve`, 1 worker, "
        "`@bentoml.api(batchable=True, max_batch_size=<lungserve max_batch_size>, "
        "max_latency_ms=<lungserve request deadline>)`; the batch decodes its files with lungserve's "
        "`load_image` and runs one ORT batch.",
        "- **Ray Serve** (`loadtest/peers/rayserve_app.py`): local Ray on loopback, no dashboard, 1 replica, "
        "`@serve.batch(max_batch_size=<max_batch_size>, batch_wait_timeout_s=<max_batch_delay_s>)`, "
        "`max_ongoing_requests=<queue_limit>`; Starlette multipart parsing, decode + ORT of the batch in a "
        "worker thread.",
        "- **mosec** (`loadtest/peers/mosec_app.py`): mosec's Rust HTTP front end; a `Decode` stage of 2 "
        "processes (the raw body: mosec has no multipart support, so the part is cut out at the boundary on "
        "the body's first line; lungserve's `load_image`) and an `Infer` stage of 1 process with "
        "`max_batch_size=<max_batch_size>`, `max_wait_time=<max_batch_delay_s>`; `--timeout` = the request "
        "deadline.",
        "- **LitServe** (`loadtest/peers/litserve_app.py`): `LitServer(workers_per_device=<cores>)` on CPU, "
        "`LitAPI(max_batch_size, batch_timeout=<max_batch_delay_s>)`; LitServe parses the multipart form, each "
        "worker decodes its batch with `load_image` and runs one ORT batch.",
        "- **Triton** (`loadtest/peers/pytriton_app.py`): Triton Inference Server through PyTriton, its C++ HTTP "
        "front end, `POST /v2/models/lung/infer` with an Open Inference Protocol v2 binary-data body (one BYTES "
        "element holding the JPEG), dynamic batcher with `max_batch_size` and `max_queue_delay_microseconds = "
        "max_batch_delay_s`; the bound Python function decodes with `load_image` and runs one ORT batch.",
        "",
        "Every peer runs the same ONNX model with 1 ORT intra-op thread per run, like lungserve on CPU.",
        "",
        "Plots: [throughput.png](throughput.png), [p99.png](p99.png). Raw figures: [results.json](results.json).",
        "",
    ]
    (out / "RESULTS.md").write_text("\n".join(lines))


def write_plots(run: Run, out: Path, levels: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "lungserve": "o-",
        "nobatch": "o--",
        "ls-fronts": "o:",
        "ls-model": "o-.",
        "bentoml": "s-",
        "rayserve": "^-",
        "seed": "x-",
        "mosec": "D-",
        "litserve": "v-",
        "triton": "P-",
    }
    for metric, ylabel, fname in (
        ("images_per_s", "images/s", "throughput.png"),
        ("p99_ms", "p99 latency (ms)", "p99.png"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, image_set in zip(axes, IMAGE_SETS, strict=True):
            set_levels = sorted({lv.concurrency for lv in run.levels if lv.image_set == image_set})
            for system in SERVED:
                pts = [(c, getattr(lv, metric)) for c in set_levels if (lv := _find(run, system, image_set, c))]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, styles[system], label=LABELS[system])
            ip = run.inprocess.get(image_set)
            if ip and metric == "images_per_s":
                ax.axhline(ip["ceiling_images_per_s"], color="grey", linestyle=":", label="in-process ceiling")
            if ip and metric == "p99_ms":
                ax.axhline(ip["single"]["p50_ms"], color="grey", linestyle=":", label="in-process single-image p50")
            ax.set_xscale("log", base=2)
            if set_levels:
                ax.set_xticks(set_levels, [str(c) for c in set_levels])
            ax.set_yscale("log")
            ax.set_xlabel("concurrency (closed loop)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"/predict, {IMAGE_SET_LABELS[image_set]}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{ylabel} vs concurrency ({run.machine['nproc']} cores, {run.started[:10]})")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="where the report goes")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated subset of {ALL_SYSTEMS}")
    p.add_argument("--concurrency", default="1,8,32,128", help="closed-loop levels (768 px originals)")
    p.add_argument("--concurrency-224", default=None, help="levels for the 224 px tiles (default: as --concurrency)")
    p.add_argument("--image-sets", default="768,224", help="comma-separated subset of 768,224")
    p.add_argument("--duration", type=int, default=20, help="measured seconds per level")
    p.add_argument("--warmup", type=int, default=5, help="warm-up seconds per level")
    p.add_argument("--images-768", type=Path, default=SHARED_DATA / "lc25000-lung-768")
    p.add_argument("--images-224", type=Path, default=SHARED_DATA / "lc25000-lung")
    p.add_argument("--tiles", type=int, default=64, help="how many 224 px tiles to rotate over")
    p.add_argument("--cache", type=Path, default=ROOT / ".bench", help="peer venvs, logs")
    p.add_argument("--quick", action="store_true", help="smoke: 3 s levels, 1 s warm-up, concurrency 1,8")
    p.add_argument("--allow-busy", action="store_true", help="measure even if the machine is busy (not for reports)")
    p.add_argument(
        "--lungserve-env",
        action="append",
        default=[],
        metavar="LUNGSERVE_X=VALUE",
        help="extra setting for the lungserve systems (repeatable; for exploring, not the shipped figures)",
    )
    p.add_argument("--from-json", type=Path, default=None, help="only rewrite the report from a results.json")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    p.add_argument("--busy-threshold", type=float, default=15.0, help="CPU %% above which the machine is busy")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3, 1
        if args.concurrency == "1,8,32,128":
            args.concurrency = "1,8"
    return args


def report_from_json(path: Path, out: Path) -> int:
    """Rewrite RESULTS.md and the plots from a results.json (the same run's figures)."""
    data = json.loads(path.read_text())
    levels_data = data.pop("levels")
    run = Run(**data)
    run.levels = [Level(**lv) for lv in levels_data]
    levels = sorted({lv.concurrency for lv in run.levels if lv.image_set == "768"})
    write_markdown(run, out, levels)
    write_plots(run, out, levels)
    print(f"bench: rewrote {out / 'RESULTS.md'} and the plots from {path}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        return report_from_json(args.from_json, args.out)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"bench: unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    levels_small = sorted({int(c) for c in (args.concurrency_224 or args.concurrency).split(",")})
    image_sets = [x.strip() for x in args.image_sets.split(",") if x.strip()]
    if not set(image_sets) <= set(IMAGE_SETS) or "768" not in image_sets:
        raise SystemExit(f"bench: --image-sets must include 768 and be a subset of {IMAGE_SETS}")
    lungserve_env: dict[str, str] = {}
    for item in args.lungserve_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("LUNGSERVE_"):
            raise SystemExit(f"bench: --lungserve-env wants LUNGSERVE_NAME=VALUE, got {item!r}")
        lungserve_env[key] = value
    if shutil.which("wrk") is None and set(systems) & set(SERVED):
        raise SystemExit("bench: wrk not found; install it (Debian/Ubuntu: apt-get install -y wrk)")

    from service.settings import Settings

    defaults = Settings()  # the environment was not consulted for LUNGSERVE_*: _base_env drops them
    lungserve_settings = {
        k: getattr(defaults, k)
        for k in (
            "max_batch_size",
            "max_batch_delay_s",
            "queue_limit",
            "request_deadline_s",
            "max_in_flight_batches",
            "preprocess_workers",
            "ort_intra_op_threads",
        )
    }
    sets = {"768": pick_images(args.images_768, 64)}
    if "224" in image_sets:
        sets["224"] = pick_images(args.images_224, args.tiles)
    cache: Path = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")  # the cache never lands in git
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Peer venvs first, so that their installation is not inside any measurement.
    for system in systems:
        if system in PEER_VENV:
            ensure_venv(PEER_VENV[system], cache)
    busy = check_quiet(args.busy_threshold, args.allow_busy)

    shown = [a if not Path(a).is_absolute() else os.path.relpath(a, ROOT) for a in sys.argv[1:]]
    run = Run(
        started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join([".venv/bin/python", "loadtest/bench.py", *shown]),
        machine=machine_description(),
        config={
            "systems": systems,
            "concurrency": levels,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "busy_before_percent": busy,
            "note": args.note,
            "lungserve_settings": lungserve_settings,
            "lungserve_env": lungserve_env,
            "input_size": json.loads((BUNDLED_MODEL / "model.json").read_text())["input_size"],
            "images": {
                k: {
                    "folder": os.path.relpath(getattr(args, f"images_{k}"), ROOT),
                    "count": len(v),
                    "files": [p.name for p in v],
                }
                for k, v in sets.items()
            },
        },
    )
    for system in systems:
        if system == "inprocess":
            bench_inprocess(run, sets, args.warmup, args.duration, int(lungserve_settings["max_batch_size"]))
        else:
            bench_served(
                system,
                run,
                sets,
                levels,
                args.warmup,
                args.duration,
                cache,
                lungserve_settings,
                lungserve_env,
                levels_small,
            )
    run.finished = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    many_set = "224" if "224" in sets else "768"
    if run.many and many_set in run.inprocess:
        run.many["inprocess_median_s"] = run.inprocess[many_set]["many"]["median_s"]
    elif run.many:
        run.many = {}  # no in-process counterpart in this run: no ratio

    payload = asdict(run)
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    write_markdown(run, out, levels)
    write_plots(run, out, levels)
    print(f"bench: wrote {out / 'RESULTS.md'}, results.json, throughput.png, p99.png", flush=True)
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # `service.settings` when run as a script
    sys.exit(main())
