"""The model process's entry point: `python -m service.processes.model --socket PATH`.

Started by the supervisor (docs/topology.md); settings come from the environment, as for every
process of `lungserve serve`. The serving itself is `service.core.model_process.ModelServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from service.core import event_loop
from service.core.model_process import ModelServer
from service.core.proctitle import die_with_parent, set_title
from service.errors import LungserveError, ModelSourceError
from service.observability.logs import configure_logging
from service.observability.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


async def run(socket_path: Path, settings: Settings, *, restart: bool = False) -> int:
    """Start, serve until SIGTERM, drain. 0, or 3 when the model could not load."""
    # Before listening: a SIGTERM from the moment a front can connect must drain, not kill.
    stop = _stop_on_sigterm()
    # Its batches, queue and in-flight runs: in one process's files, summed into every front's
    # /metrics when the supervisor set PROMETHEUS_MULTIPROC_DIR (else nobody reads them).
    metrics = Metrics(CollectorRegistry(), settings.max_batch_size, "model")
    if restart:
        metrics.restarted("model")
    server = ModelServer(
        settings,
        observer=metrics.batcher_observer,
        on_swap=lambda runtime: metrics.set_model(runtime.identity, runtime.provider),
    )
    try:
        await server.start(socket_path)
    except ModelSourceError as exc:
        log.error("model not loaded from %s: %s", settings.model_uri, exc)
        return 3
    serving = server.state.current()
    metrics.set_model(serving.identity, serving.provider)
    metrics.set_ready(True)  # the model process's vote in lungserve_model_ready (the minimum)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_on_signal(server)))
    await stop.wait()
    metrics.set_ready(False)
    await server.stop()
    return 0


async def _reload_on_signal(server: ModelServer) -> None:
    try:
        await server.reloader.reload()
    except LungserveError as exc:
        log.warning("SIGHUP reload: %s", exc.message)


def _stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: object) -> None:
        # signal.signal, not loop.add_signal_handler: asyncio restores the default action
        # when its loop closes, and a second SIGTERM then would kill a clean exit.
        with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting anyway
            loop.call_soon_threadsafe(stop.set)

    signal.signal(signal.SIGTERM, on_sigterm)
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lungserve-model")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent", type=int, help="the supervisor's pid: exit with it")
    parser.add_argument("--restart", action="store_true", help="this model process replaces one that exited")
    args = parser.parse_args(argv)
    set_title("lungserve: model")
    if args.parent is not None:
        die_with_parent(args.parent)
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides the order of shutdown
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before the model is up: it loads the newest anyway
    code = event_loop.run(run(args.socket, settings, restart=args.restart))
    # Python puts SIGTERM back to its default as it finalises: a second SIGTERM while we exit
    # would turn a clean drain into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
