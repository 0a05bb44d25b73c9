"""`lungserve serve` with LUNGSERVE_WORKERS > 1: the supervisor of fronts and the model process.

The supervisor binds the listening socket(s) once and starts:

* one **model process** (`service.processes.model`) when inference is remote: it owns the
  device, and the fronts reach it through `service.core.transport`;
* N **fronts** (`service.processes.front`), each the whole FastAPI app on uvicorn, sharing the socket
  (the kernel spreads connections over the processes that accept on it). Slide jobs run in
  front 0 only; the others forward /jobs to it on a private Unix socket
  (`service.http.jobs_forward`), and a replacement front 0 recovers them from the job store.

It holds no request state, so it cannot lose any: it only starts, watches, restarts and stops.

* A front that dies is replaced; its cell of the shared queue bound is zeroed first.
* The model process dying is seen by every front at once (its waiting images get JSON 503,
  readiness turns 503); the supervisor starts a new one, and the fronts reconnect once it is warm.
* SIGTERM/SIGINT: the fronts get SIGTERM (readiness 503, then they stop accepting and finish
  what they admitted, served by the model process meanwhile); once every front has exited the
  model process gets SIGTERM and drains; exit 0. A second signal is passed on (fronts skip their
  delay). SIGHUP is passed to the model process (hot reload), or to each front that serves its
  own model.
* A child whose first start exits with status 2 or 3 (bad settings, model not loadable) ends the
  supervisor with that status: restarting would fail the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.proctitle import set_title
from service.core.queue_bound import QueueBound

if TYPE_CHECKING:  # the supervisor process itself imports only the standard library
    from service.settings import Settings

log = logging.getLogger(__name__)

_STARTUP_FAILURES = (2, 3)  # bad settings; the model could not be loaded
_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # before the n-th quick restart of the same child in a row
_QUICK_S = 10.0  # a child that lived shorter than this counts as a quick failure
LISTEN_BACKLOG = 2048  # the kernel's queue of connections not yet accepted by any front


@dataclass
class _Child:
    role: str  # "model" or "front"
    index: int
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None  # waiting out a back-off
    stop_sent: bool = False
    exit_codes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "model process" if self.role == "model" else f"front {self.index}"


class Supervisor:
    def __init__(
        self,
        *,
        workers: int,
        remote_model: bool,
        public: list[socket.socket],
        shared: list[socket.socket],
        stop_timeout_s: float = 120.0,
    ) -> None:
        if len(public) != workers:
            raise ValueError(f"{workers} fronts need {workers} public sockets, got {len(public)}")
        self.workers = workers
        # After SIGTERM, how long the children may take before they are killed (a front stuck
        # starting up -- e.g. waiting for a model that never loads -- must not hang the exit).
        self.stop_timeout_s = stop_timeout_s
        self._kill_at: float | None = None
        self.remote_model = remote_model
        # Front i accepts on public[i] (kept open here across its restarts: connections the
        # kernel queued on it meanwhile wait for the replacement) and on every shared socket.
        self.public = public
        self.shared = shared
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="lungserve-"))
        self.model_socket = self.runtime_dir / "model.sock"
        self.queue_bound = self.runtime_dir / "queue"
        # Slide jobs run in front 0 only; the other fronts forward /jobs to it over this socket.
        self.jobs_socket = self.runtime_dir / "jobs.sock"
        QueueBound.create(self.queue_bound)
        # One /metrics for the whole server: every child writes its values here, and a front
        # answering a scrape sums them (service.observability.metrics).
        self.metrics_dir = self.runtime_dir / "metrics"
        self.metrics_dir.mkdir()
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []
        self._stopping = False
        self._exit_status = 0
        self._children: list[_Child] = []

    # -- children ----------------------------------------------------------------------------

    def _plan(self) -> None:
        python = sys.executable
        if self.remote_model:
            argv = [python, "-m", "service.processes.model", "--parent", str(os.getpid())]
            argv += ["--socket", str(self.model_socket)]
            self._children.append(_Child("model", 0, argv))
        for i in range(self.workers):
            fds = tuple(s.fileno() for s in [self.public[i], *self.shared])
            argv = [python, "-m", "service.processes.front", "--index", str(i), "--parent", str(os.getpid())]
            argv += [arg for fd in fds for arg in ("--fd", str(fd))]
            argv += ["--queue-bound", str(self.queue_bound)]  # queue_limit for the server, either placement
            if self.remote_model:
                argv += ["--model-socket", str(self.model_socket)]
            if self.workers > 1:
                argv += ["--jobs-socket", str(self.jobs_socket), *(["--jobs-owner"] if i == 0 else [])]
            self._children.append(_Child("front", i, argv, fds))

    def _start(self, child: _Child) -> None:
        # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which keeps the
        # order (fronts, then the model process). Children exit with it (die_with_parent).
        argv = [*child.argv, "--restart"] if child.exit_codes else child.argv  # counted in /metrics
        child.proc = subprocess.Popen(argv, pass_fds=child.pass_fds, process_group=0, env=self._env)
        child.pidfd = os.pidfd_open(child.proc.pid)
        child.started_at = time.monotonic()
        child.restart_at = None
        self._selector.register(child.pidfd, selectors.EVENT_READ, child)
        log.info("started %s (pid %d)", child.name, child.proc.pid, extra={"pid": child.proc.pid, "role": child.role})

    def _reap(self, child: _Child) -> None:
        assert child.proc is not None
        self._selector.unregister(child.pidfd)
        os.close(child.pidfd)
        pid = child.proc.pid
        code = child.proc.wait()
        child.exit_codes.append(code)
        # Its live gauges (queue depth, in flight, ready) stop counting; counters stay summed.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        lived = time.monotonic() - child.started_at
        child.proc = None
        if child.role == "front":
            QueueBound.reset(self.queue_bound, child.index)  # nothing it admitted waits any more
        if self._stopping:
            log.info("%s exited (status %d)", child.name, code)
            return
        if code in _STARTUP_FAILURES and len(child.exit_codes) == 1:
            # Its first start failed on settings or the model: every restart would too.
            log.error("%s could not start (status %d): stopping", child.name, code)
            self._exit_status = code
            self._begin_stop()
            return
        child.quick_failures = child.quick_failures + 1 if lived < _QUICK_S else 0
        delay = _BACKOFF_S[min(child.quick_failures, len(_BACKOFF_S) - 1)]
        log.warning(
            "%s exited (status %d) after %.1f s: restarting in %.1f s",
            child.name,
            code,
            lived,
            delay,
            extra={"role": child.role, "status": code, "restart_in_s": delay},
        )
        child.restart_at = time.monotonic() + delay

    # -- signals -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # handled in the loop, not in the handler
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _handle(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            targets = [c for c in self._children if c.role == "model"] or [c for c in self._children]
            for child in targets:
                self._send(child, signal.SIGHUP)
            log.info("SIGHUP: model reload requested")
            return
        if self._stopping:
            for child in self._children:
                if child.role == "front":
                    self._send(child, signal.SIGTERM)  # a second signal: the fronts skip their delay
            return
        self._begin_stop()

    def _begin_stop(self) -> None:
        self._stopping = True
        self._kill_at = time.monotonic() + self.stop_timeout_s
        log.info("stopping: fronts first, then the model process")
        for child in self._children:
            child.restart_at = None
            if child.role == "front":
                self._send(child, signal.SIGTERM)
        for sock in [*self.public, *self.shared]:
            sock.close()  # the fronts hold their own copies until they stop accepting

    @staticmethod
    def _send(child: _Child, signum: int) -> None:
        if child.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signum)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        set_title("lungserve: supervisor")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            self._plan()
            for child in self._children:
                self._start(child)
            while True:
                self._step()
                fronts_alive = any(c.proc is not None for c in self._children if c.role == "front")
                if self._stopping and not fronts_alive:
                    model = [c for c in self._children if c.role == "model" and c.proc is not None]
                    if not model:
                        break
                    for child in model:
                        if not child.stop_sent:
                            self._send(child, signal.SIGTERM)  # the fronts are done: now drain it
                            child.stop_sent = True
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for child in self._children:
                self._send(child, signal.SIGKILL)
                if child.proc is not None:
                    child.proc.wait()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        log.info("supervisor stopped (status %d)", self._exit_status)
        return self._exit_status

    def _step(self) -> None:
        now = time.monotonic()
        waits = [c.restart_at - now for c in self._children if c.restart_at is not None]
        if self._kill_at is not None:
            waits.append(self._kill_at - now)
            if now >= self._kill_at:
                log.error("children still running %.0f s after SIGTERM: killing them", self.stop_timeout_s)
                self._exit_status = self._exit_status or 1
                for child in self._children:
                    self._send(child, signal.SIGKILL)
                self._kill_at = None
                waits.pop()
        timeout = max(0.0, min(waits)) if waits else None
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                signals, self._signals = self._signals, []
                for signum in signals:
                    self._handle(signum)
            else:
                self._reap(key.data)
        now = time.monotonic()
        for child in self._children:
            if child.restart_at is not None and child.restart_at <= now and not self._stopping:
                self._start(child)


def remote_inference(settings: Settings) -> bool:
    """Whether the fronts use one model process (else each front runs its own model).

    auto: the model process when ONNX Runtime can use CUDA (the GPU must have one owner, and
    batches spanning every front keep it busy); on CPU, a model in each front, which measured
    faster on two cores (docs/topology.md: no transport, and ORT's one thread per run scales
    with the fronts).
    """
    if settings.inference != "auto":
        return settings.inference == "model-process"
    if settings.provider == "cpu":
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def listen_each(host: str, port: int, fronts: int) -> list[socket.socket]:
    """The public port: one listening socket per front, in one SO_REUSEPORT group.

    The kernel spreads new connections over the group by address hash. On one shared socket,
    whichever front came back to accept first took them: 32 keep-alive connections split as
    unevenly as 30/2 and 32/0, one front serving nearly all of them on one core
    (docs/topology.md).
    """
    return [listen(host, port, reuse_port=True) for _ in range(fronts)]


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket bound here and inherited by the fronts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock
