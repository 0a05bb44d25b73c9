"""A front process of `lungserve serve` (LUNGSERVE_WORKERS > 1): the whole app on uvicorn, on the
listening socket(s) the supervisor bound and passed down (docs/topology.md).

    python -m service.processes.front --index N --fd FD [--fd FD] --queue-bound P [--model-socket P]
        [--jobs-socket P [--jobs-owner]]

With `--model-socket`, the app's model is the model process (`RemoteModelClient`); without, the
front loads its own (inference in the front). Either way its admissions count in the server's
one queue bound (`--queue-bound`, cell N). With `--jobs-socket`, slide jobs run in the front
given `--jobs-owner` (front 0), which also serves the app on that Unix socket; the others forward
/jobs there (service.http.jobs_forward); without, the front runs its own. Settings come from the
environment, as for every process of the server. The shutdown order is the single process's (service.http.server): on
SIGTERM, readiness 503, then the listener closes and what was admitted finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from fastapi import FastAPI

from service.app import GrpcUnavailable, create_app
from service.core.proctitle import die_with_parent, set_title
from service.core.queue_bound import QueueBound
from service.core.remote_model import RemoteModel
from service.errors import LungserveError
from service.http.access import ApiKeysFileError
from service.http.jobs_forward import JobsPlacement, private_socket
from service.http.server import build_server
from service.observability.logs import configure_logging
from service.settings import Settings

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lungserve-front")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--fd", type=int, action="append", required=True, help="an inherited listening socket")
    parser.add_argument("--model-socket", type=Path)
    parser.add_argument("--queue-bound", type=Path)
    parser.add_argument("--jobs-socket", type=Path, help="front 0's private socket for /jobs (several fronts)")
    parser.add_argument("--jobs-owner", action="store_true", help="run the slide jobs and serve --jobs-socket")
    parser.add_argument("--parent", type=int, help="the supervisor's pid: exit with it")
    parser.add_argument("--restart", action="store_true", help="this front replaces one that exited")
    args = parser.parse_args(argv)
    set_title(f"lungserve: front {args.index}")
    if args.parent is not None:
        die_with_parent(args.parent)
    settings = Settings()
    remote = None
    bound = None
    if args.model_socket is not None and args.queue_bound is not None:
        remote = RemoteModel(args.model_socket, args.queue_bound, args.index)
    elif args.queue_bound is not None:  # the model in this front, queue_limit the server's
        bound = QueueBound(args.queue_bound, args.index, settings.queue_limit)
    placement = JobsPlacement(args.jobs_socket, owner=args.jobs_owner) if args.jobs_socket is not None else None
    try:
        # Reads LUNGSERVE_API_KEYS_FILE, checks the grpc extra.
        app = create_app(
            settings, remote=remote, queue_bound=bound, jobs_placement=placement, process=f"front {args.index}"
        )
    except (ApiKeysFileError, GrpcUnavailable) as exc:
        print(f"lungserve front {args.index}: {exc}", file=sys.stderr)
        return 2  # the supervisor stops: every restart would fail the same way
    configure_logging(settings.log_level, json=settings.log_json)
    if args.restart:
        app.state.metrics.restarted("front")
    server, _ = build_server(app, settings)
    sockets = [socket.socket(fileno=fd) for fd in args.fd]
    if placement is not None and placement.owner:
        # The other fronts' /jobs arrive here. First: uvicorn listens in this order, so front 0
        # takes requests of its own only once it takes theirs.
        sockets.insert(0, private_socket(placement.socket))

    def reload(signum: int, frame: object) -> None:
        # SIGHUP (passed on by the supervisor when the model runs in the fronts): hot reload,
        # as /admin/reload does. The handler runs on the loop's thread, between two bytecodes.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving yet: nothing to reload
        loop.call_soon_threadsafe(lambda: loop.create_task(_reload(app)))

    signal.signal(signal.SIGHUP, reload)
    previous = signal.signal(signal.SIGTERM, server.handle_exit_outside_serve)  # as `lungserve serve`
    try:
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        log.error("front %d: start-up failed", args.index)
        return 3
    return 0


async def _reload(app: FastAPI) -> None:
    try:
        result = await app.state.reloader.reload()
    except LungserveError as exc:
        log.warning("SIGHUP reload: %s", exc.message)
        return
    log.info("SIGHUP reload: now %s", result.current.version)


if __name__ == "__main__":
    sys.exit(main())
