"""ONNX Runtime alone, on the served model: one image's latency and the cost under load, by
intra-op threads, and the CPU per image by batch size (no HTTP, no decode).

    python loadtest/ort_threads.py [--model service/bundled_model] [--seconds 4]

Why the server runs one intra-op thread per run on CPU (service/core/engine.py), and what that
costs one lone request. Prints one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

CONFIGS = ((1, True), (2, True), (2, False))  # (intra-op threads, spinning)


def session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def two_at_once(
    sess: ort.InferenceSession, outputs: list[str], feed: dict[str, np.ndarray], seconds: float
) -> tuple[float, float]:
    """Two runs at once (the server's max_in_flight_batches under load): images/s, CPU s per image."""
    done = [0, 0]
    stop = time.perf_counter() + seconds
    batch = len(next(iter(feed.values())))

    def worker(slot: int) -> None:
        while time.perf_counter() < stop:
            sess.run(outputs, feed)
            done[slot] += batch

    cpu = time.process_time()
    workers = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    total = sum(done)
    return total / seconds, (time.process_time() - cpu) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("service/bundled_model"))
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput measurement")
    args = parser.parse_args(argv)
    manifest = json.loads((args.model / "model.json").read_text())
    path, side, name = args.model / manifest["file"], manifest["input_size"], manifest["input_name"]
    # What /predict fetches (as loadtest/model_infer_cost.py): the probabilities and the OOD score.
    outputs = [manifest["output_name"]] + (["ood_score"] if "ood_score" in (manifest.get("outputs") or {}) else [])
    images = np.random.default_rng(0).integers(0, 256, (16, side, side, 3), np.uint8)
    for threads, spinning in CONFIGS:
        sess = session(path, threads, spinning)
        one = {name: images[:1]}
        for _ in range(20):
            sess.run(outputs, one)
        times = []
        for _ in range(200):
            start = time.perf_counter()
            sess.run(outputs, one)
            times.append(time.perf_counter() - start)
        times.sort()
        per_s, cpu_per_image = two_at_once(sess, outputs, {name: images[:4]}, args.seconds)
        print(
            f"threads={threads} spinning={spinning}: one image p50 {statistics.median(times) * 1e3:.2f} ms, "
            f"p99 {times[197] * 1e3:.2f} ms | 2 runs at once, batches of 4: {per_s:.0f} images/s, "
            f"{cpu_per_image * 1e3:.2f} ms CPU per image"
        )
    sess = session(path, 1, True)
    for batch in (1, 2, 4, 8, 16):
        feed = {name: images[:batch]}
        for _ in range(5):
            sess.run(outputs, feed)
        count, cpu, start = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - start < args.seconds / 2:
            sess.run(outputs, feed)
            count += batch
        print(f"threads=1 batch={batch}: {(time.process_time() - cpu) / count * 1e3:.2f} ms CPU per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
