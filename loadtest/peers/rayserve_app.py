"""Ray Serve peer: the bundled ONNX model behind `@serve.batch`.

Started by loadtest/bench.py from the Ray Serve virtual environment:

    RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=<repo> .bench/venvs/rayserve/bin/python \
        loadtest/peers/rayserve_app.py --model <repo>/service/bundled_model --port 8002

A local Ray (loopback only, no dashboard, 2 CPUs) with one replica. `POST /predict` reads the
multipart field `file` (Starlette's parser) and awaits a `@serve.batch` method that gathers
up to --max-batch-size images (lungserve's max_batch_size) waiting at most
--batch-wait-timeout-s after the first (lungserve's max_batch_delay_s). The batch is decoded
with lungserve's own `load_image` and run as one ORT batch in a worker thread, so the replica's
event loop keeps parsing requests meanwhile. `max_ongoing_requests` is raised from Ray's
default (5, less than one batch) to lungserve's queue limit. Runs until SIGTERM/SIGINT.
"""
# mypy: disable-error-code="import-not-found,untyped-decorator,misc,no-untyped-call"

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path
from typing import Any, cast

import ray
from common import OnnxClassifier
from ray import serve
from starlette.requests import Request


def build_app(model_dir: Path, max_batch_size: int, wait_s: float, max_ongoing: int) -> Any:
    @serve.deployment(
        name="lungserve-peer",
        num_replicas=1,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": 1},
    )
    class LungRay:
        def __init__(self) -> None:
            self.model = OnnxClassifier(model_dir)
            self.model.warm_up(max_batch_size)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)
        async def predict_batch(self, images: list[bytes]) -> list[dict[str, Any]]:
            return await asyncio.to_thread(self.model.predict_bytes, images)

        async def __call__(self, request: Request) -> dict[str, Any]:
            form = await request.form()
            upload = form["file"]
            data = await upload.read() if hasattr(upload, "read") else str(upload).encode()
            result: dict[str, Any] = await self.predict_batch(data)
            return result

    return cast(Any, LungRay).bind()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--max-ongoing-requests", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=args.num_cpus, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(
            build_app(args.model, args.max_batch_size, args.batch_wait_timeout_s, args.max_ongoing_requests),
            name="lungserve-peer",
            route_prefix="/predict",
        )
        print(f"rayserve peer ready on http://127.0.0.1:{args.port}/predict", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
