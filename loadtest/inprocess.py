"""The in-process ceiling: decode + preprocess + ONNX Runtime with no HTTP at all.

Run by loadtest/bench.py in a child process (its own memory, nothing else in it):

    .venv/bin/python loadtest/inprocess.py --model service/bundled_model --duration 20 FILE...

Prints one JSON object: `single` (one image at a time), `variants` (images/s over both cores),
`many` and `physical_bound_images_per_s`. What each measures: docs/benchmarks/METHOD.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repo's `service` importable
    sys.path.insert(0, str(ROOT))

from service.model.preprocess import load_image  # noqa: E402  (after the path set-up above)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _session(model: Path, intra_threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if intra_threads is not None:
        opts.intra_op_num_threads = intra_threads
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def measure_single(
    images: list[bytes], size: int, sess: ort.InferenceSession, names: tuple[str, str], seconds: float
) -> dict[str, float]:
    """Sequential single-image latency (ms): total, decode only, inference only."""
    in_name, out_name = names
    total: list[float] = []
    decode: list[float] = []
    infer: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end or len(total) < 20:
        data = images[i % len(images)]
        i += 1
        t0 = time.perf_counter()
        arr = load_image(data, size)
        t1 = time.perf_counter()
        sess.run([out_name], {in_name: arr[np.newaxis]})
        t2 = time.perf_counter()
        total.append((t2 - t0) * 1e3)
        decode.append((t1 - t0) * 1e3)
        infer.append((t2 - t1) * 1e3)
    return {
        "n": len(total),
        "p50_ms": _percentile(total, 50),
        "p95_ms": _percentile(total, 95),
        "p99_ms": _percentile(total, 99),
        "mean_ms": statistics.fmean(total),
        "decode_p50_ms": _percentile(decode, 50),
        "infer_p50_ms": _percentile(infer, 50),
    }


def run_pool2_single(
    images: list[bytes], size: int, sess: ort.InferenceSession, names: tuple[str, str], seconds: float
) -> int:
    in_name, out_name = names
    stop = threading.Event()
    counts = [0, 0]

    def worker(k: int) -> None:
        i = k
        while not stop.is_set():
            arr = load_image(images[i % len(images)], size)
            sess.run([out_name], {in_name: arr[np.newaxis]})
            counts[k] += 1
            i += 2

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(worker, k) for k in (0, 1)]
        time.sleep(seconds)
        stop.set()
        for f in futures:
            f.result()
    return sum(counts)


def run_pool2_decode_batch(
    images: list[bytes],
    size: int,
    sess: ort.InferenceSession,
    names: tuple[str, str],
    seconds: float,
    max_batch: int = 16,
) -> int:
    """2 decode threads -> bounded queue -> 1 inference thread taking whatever is ready (<= max_batch)."""
    in_name, out_name = names
    stop = threading.Event()
    ready: queue.Queue[np.ndarray[Any, Any]] = queue.Queue(maxsize=4 * max_batch)
    done = [0]

    def decoder(k: int) -> None:
        i = k
        while not stop.is_set():
            arr = load_image(images[i % len(images)], size)
            i += 2
            while not stop.is_set():
                try:
                    ready.put(arr, timeout=0.05)
                    break
                except queue.Full:
                    continue

    def infer() -> None:
        while not stop.is_set():
            try:
                batch = [ready.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < max_batch:
                try:
                    batch.append(ready.get_nowait())
                except queue.Empty:
                    break
            sess.run([out_name], {in_name: np.stack(batch)})
            done[0] += len(batch)

    threads = [threading.Thread(target=decoder, args=(k,)) for k in (0, 1)] + [threading.Thread(target=infer)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return done[0]


def run_many(images: list[bytes], size: int, sess: ort.InferenceSession, names: tuple[str, str], repeats: int) -> float:
    """Median seconds to decode + classify every image once, on a pool of 2 threads."""
    in_name, out_name = names

    def one(data: bytes) -> None:
        sess.run([out_name], {in_name: load_image(data, size)[np.newaxis]})

    times: list[float] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(one, images))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def physical_bound(
    images: list[bytes], size: int, sess: ort.InferenceSession, names: tuple[str, str], max_batch: int
) -> dict[str, float]:
    """CPU milliseconds per image of decode and of batched inference (1 thread), and cores / their sum."""
    in_name, out_name = names
    t0 = time.process_time()
    arrays = [load_image(images[i % len(images)], size) for i in range(max(64, len(images)))]
    decode_ms = (time.process_time() - t0) / len(arrays) * 1e3
    batch = np.stack(arrays[:max_batch])
    sess.run([out_name], {in_name: batch})
    t0 = time.process_time()
    runs = 20
    for _ in range(runs):
        sess.run([out_name], {in_name: batch})
    infer_ms = (time.process_time() - t0) / (runs * len(batch)) * 1e3
    cores = len(os.sched_getaffinity(0))
    return {
        "decode_cpu_ms": decode_ms,
        "infer_cpu_ms": infer_ms,
        "cores": cores,
        "images_per_s": cores * 1e3 / (decode_ms + infer_ms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="folder with model.json + model.onnx")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput variant")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--many-repeats", type=int, default=5, help="repeats of the whole-list `many` timing")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)

    manifest = json.loads((args.model / "model.json").read_text())
    size = int(manifest["input_size"])
    names = (str(manifest["input_name"]), str(manifest["output_name"]))
    onnx_path = args.model / str(manifest.get("file", "model.onnx"))
    images = [p.read_bytes() for p in args.files]

    default_sess = _session(onnx_path, None)  # as the server: ORT picks the thread count
    one_thread_sess = _session(onnx_path, 1)

    measure_single(images, size, default_sess, names, args.warmup)
    single = measure_single(images, size, default_sess, names, min(args.duration, 10.0))

    variants: dict[str, dict[str, float]] = {}
    runs: dict[str, Callable[[float], int]] = {
        "pool2-single": lambda s: run_pool2_single(images, size, one_thread_sess, names, s),
        "pool2-decode-batch": lambda s: run_pool2_decode_batch(
            images, size, default_sess, names, s, max_batch=args.max_batch
        ),
    }
    for name, run in runs.items():
        run(args.warmup)
        t0 = time.perf_counter()
        n = run(args.duration)
        wall = time.perf_counter() - t0
        variants[name] = {"images": n, "seconds": wall, "images_per_s": n / wall}

    best = max(variants, key=lambda k: variants[k]["images_per_s"])
    run_many(images, size, one_thread_sess, names, 1)
    many_s = run_many(images, size, one_thread_sess, names, args.many_repeats)
    bound = physical_bound(images, size, one_thread_sess, names, args.max_batch)
    out = {
        "images": len(images),
        "input_size": size,
        "single": single,
        "variants": variants,
        "ceiling_variant": best,
        "ceiling_images_per_s": variants[best]["images_per_s"],
        "many": {"images": len(images), "median_s": many_s},
        "physical_bound": bound,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "onnxruntime": ort.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
