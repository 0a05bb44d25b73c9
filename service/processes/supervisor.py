"""The supervisor's entry point: `python -m service.processes.supervisor --workers N --public-fd FD ...`.

`lungserve serve` reads and checks the settings and binds the sockets, then replaces itself with
this program (exec, same pid): the supervisor only starts, watches and stops processes, so it
keeps the standard library in memory and not the app, pydantic and numpy it never uses.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from service.core.supervisor import Supervisor
from service.observability.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.processes.supervisor")
    p.add_argument("--workers", type=int, required=True, help="front processes")
    p.add_argument("--model-process", action="store_true", help="one model process for the fronts")
    p.add_argument("--public-fd", type=int, action="append", default=[], help="front N's public socket, in order")
    p.add_argument("--shared-fd", type=int, action="append", default=[], help="a socket every front accepts on")
    p.add_argument("--stop-timeout", type=float, required=True, help="seconds the children get after SIGTERM")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true")
    args = p.parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    public = [socket.socket(fileno=fd) for fd in args.public_fd]
    shared = [socket.socket(fileno=fd) for fd in args.shared_fd]
    for sock in [*public, *shared]:
        sock.set_inheritable(True)
    return Supervisor(
        workers=args.workers,
        remote_model=args.model_process,
        public=public,
        shared=shared,
        stop_timeout_s=args.stop_timeout,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
