"""A real model process (`service.core.model_process`) for tests, and the fronts' way to reach it.

Synchronised on its log: `start()` returns once it has logged "model process ready" (it listens
only after its warm-up), never after a sleep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service.core.queue_bound import QueueBound
from service.core.remote_client import RemoteModelClient

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "model process ready"
READY_TIMEOUT_S = 60.0


@dataclass
class ModelProcess:
    folder: Path
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    queue_limit: int = 256
    exited: list[subprocess.Popen[str]] = field(default_factory=list)  # killed by a test

    @property
    def socket_path(self) -> Path:
        return self.folder / "model.sock"

    @property
    def bound_path(self) -> Path:
        return self.folder / "queue"

    def start(self) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LUNGSERVE_")}
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        environment.update(self.env)
        if self.proc is not None:
            self.exited.append(self.proc)
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.processes.model", "--socket", str(self.socket_path)],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.proc = proc
        ready = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            with proc.stderr:
                for line in proc.stderr:
                    self.lines.append(line)
                    if READY_LINE in line:
                        ready.set()
            ready.set()  # exited: start() reports it

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or proc.poll() is not None:
            raise RuntimeError("model process did not become ready:\n" + self.output())

    def output(self) -> str:
        return "".join(self.lines)

    def client(self, front: int = 0) -> RemoteModelClient:
        return RemoteModelClient(self.socket_path, QueueBound(self.bound_path, front, self.queue_limit), front=front)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(30)
        self.proc = None
        return code


@contextmanager
def model_process(folder: Path, queue_limit: int = 256, **env: str) -> Iterator[ModelProcess]:
    """A model process serving the model in `folder/model`, with LUNGSERVE_* settings `env`."""
    settings = {
        "LUNGSERVE_MODEL_URI": str(folder / "model"),
        "LUNGSERVE_QUEUE_LIMIT": str(queue_limit),
        "LUNGSERVE_LOG_JSON": "true",
        **env,
    }
    process = ModelProcess(folder, settings, queue_limit=queue_limit)
    QueueBound.create(process.bound_path)
    process.start()
    try:
        yield process
    finally:
        if process.proc is not None:
            process.proc.kill()
            process.proc.wait()
        for proc in process.exited:
            proc.wait()
