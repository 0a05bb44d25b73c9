"""Feed capacity: how many images/s the front-to-model path carries, without HTTP or decode.

    .venv/bin/python loadtest/feed.py --feeders 2 --duration 10

A model process (`service.core.model_process`, the real one, in its own process) serves a
trivial ONNX graph (tests/onnx_models.py: cast, mean, linear, softmax) at 128 px; `--feeders`
processes each run a `RemoteModelClient` (the fronts' client, on a front's event loop: uvloop when
installed; `--loop asyncio` for asyncio's own) and push already-decoded uint8 tensors through the
real transport (shared-memory arenas, batched control frames), the shared queue bound and the
model process's batcher, `--concurrency` requests of `--images` images at once per feeder.
What is measured is everything a front adds on top of decode: admission, the transport,
batching, the decision beside the output. The last line is `images_per_s=N`.

On a GPU host the same path must outrun the fronts' decoding (~12,000 images/s on 16 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repo's `service` and `tests` importable
    sys.path.insert(0, str(ROOT))

from service.core import event_loop  # noqa: E402
from service.core.queue_bound import QueueBound  # noqa: E402
from service.core.remote_client import RemoteModelClient  # noqa: E402


async def _feed(
    index: int, socket_path: Path, bound_path: Path, args: argparse.Namespace, start_at: float
) -> tuple[int, int, float]:
    client = RemoteModelClient(socket_path, QueueBound(bound_path, index, args.queue_limit), front=index)
    await client.start()
    rng = np.random.default_rng(index)
    side = client.input_size
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(args.images)]
    counted = refused = 0
    stop_at = start_at + args.warm_up + args.duration

    async def worker() -> None:
        nonlocal counted, refused
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < stop_at:
            try:
                reservation = client.reserve(len(images))
            except Exception:
                refused += 1
                await asyncio.sleep(0)
                continue
            with reservation:
                await asyncio.gather(*(client.infer(reservation, image) for image in images))
            if now >= start_at + args.warm_up:
                counted += len(images)

    async def cpu_window() -> float:
        # This process's CPU seconds inside the measured window.
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start_at + args.warm_up - loop.time()))
        begun = time.process_time()
        await asyncio.sleep(max(0.0, stop_at - loop.time()))
        return time.process_time() - begun

    cpu = asyncio.ensure_future(cpu_window())
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    cpu_s = await cpu
    await client.stop(5.0)
    return counted, refused, cpu_s


def _feeder(
    index: int,
    socket_path: Path,
    bound_path: Path,
    args: argparse.Namespace,
    start_at: float,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    # loop.time() is time.monotonic(): the same clock in every process.
    feed = _feed(index, socket_path, bound_path, args, start_at)
    # A front runs its client on uvicorn's loop: uvloop when installed (loop="auto").
    out.put(event_loop.run(feed) if args.loop == "front" else asyncio.run(feed))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a child process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feeders", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--concurrency", type=int, default=16, help="requests at once per feeder")
    parser.add_argument("--images", type=int, default=16, help="images per request")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warm-up", type=float, default=2.0)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--queue-limit", type=int, default=1024)
    parser.add_argument("--in-flight", type=int, default=2, help="LUNGSERVE_MAX_IN_FLIGHT_BATCHES")
    parser.add_argument("--tissue-check", choices=("true", "false"), default="true")
    parser.add_argument(
        "--loop",
        choices=("front", "asyncio"),
        default="front",
        help="the feeders' event loop: a front's (uvloop when installed), or asyncio's own",
    )
    args = parser.parse_args()

    from tests.onnx_models import pixel_model_bytes, write_model_dir

    with tempfile.TemporaryDirectory(prefix="lungserve-feed-") as tmp:
        folder = Path(tmp)
        write_model_dir(folder / "model", data=pixel_model_bytes(input_size=args.side), input_size=args.side)
        socket_path = folder / "model.sock"
        bound_path = folder / "queue"
        QueueBound.create(bound_path)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "LUNGSERVE_MODEL_URI": str(folder / "model"),
            "LUNGSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "LUNGSERVE_QUEUE_LIMIT": str(args.queue_limit),
            "LUNGSERVE_MAX_IN_FLIGHT_BATCHES": str(args.in_flight),
            "LUNGSERVE_TISSUE_CHECK": args.tissue_check,
            "LUNGSERVE_LOG_JSON": "true",
        }
        model = subprocess.Popen(
            [sys.executable, "-m", "service.processes.model", "--socket", str(socket_path)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert model.stderr is not None
            for line in model.stderr:  # synchronise on its ready line
                if "model process ready" in line:
                    break
            else:
                print("the model process exited before it was ready", file=sys.stderr)
                return 1
            # Keep reading its log: a full pipe would stop the model process mid-run.
            threading.Thread(target=model.stderr.read, daemon=True).start()
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            start_at = time.monotonic() + 3.0  # the feeders' interpreters start meanwhile
            feeders = [
                ctx.Process(target=_feeder, args=(i, socket_path, bound_path, args, start_at, out))
                for i in range(args.feeders)
            ]
            for p in feeders:
                p.start()
            time.sleep(max(0.0, start_at + args.warm_up - time.monotonic()))
            model_cpu = _cpu_s(model.pid)
            time.sleep(max(0.0, start_at + args.warm_up + args.duration - time.monotonic()))
            model_cpu = _cpu_s(model.pid) - model_cpu
            results = [out.get() for _ in feeders]
            for p in feeders:
                p.join()
        finally:
            model.terminate()
            model.wait()
    images = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    feeders_cpu = sum(r[2] for r in results)
    rate = images / args.duration
    report = {
        **vars(args),
        "images": images,
        "refused_requests": refused,
        # CPU per image, so that a busy machine's figure can be read too: at 100% of every core,
        # the path would carry cores / (model + feeders CPU per image).
        "model_cpu_us_per_image": round(model_cpu / max(images, 1) * 1e6, 1),
        "feeders_cpu_us_per_image": round(feeders_cpu / max(images, 1) * 1e6, 1),
        "cpu_bound_images_per_s": round(len(os.sched_getaffinity(0)) * images / max(model_cpu + feeders_cpu, 1e-9)),
    }
    print(json.dumps(report))
    print(f"images_per_s={rate:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
