"""/explain images/s beside /predict, on one `lungserve serve` of this tree, in one run.

Closed loop: `--concurrency` clients each send the next image as soon as their previous answer
came back, first to /predict, then to /explain (same images, same server, same settings),
each for `--duration` seconds after a `--warmup`. Every answer must be a 200 with a label
(and an overlay PNG for /explain), or the run fails.

    .venv/bin/python loadtest/explain_bench.py --model DIR --out docs/benchmarks/explain.md

The model must have the Grad-CAM outputs (model contract v2); images default to the 768 px
LC25000 originals beside the clone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules

from serverproc import ROOT, server


async def closed_loop(
    url: str, path: str, images: list[tuple[str, bytes]], concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    latencies: list[float] = []
    done = 0
    errors: list[str] = []
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        i = worker
        while (now := time.perf_counter()) < stop_at:
            name, data = images[i % len(images)]
            i += concurrency
            response = await http.post(path, files={"file": (name, data, "image/jpeg")})
            finished = time.perf_counter()
            body = response.json()
            ok = response.status_code == 200 and "label" in body
            if path == "/explain":
                ok = ok and bool(body.get("explanation", {}).get("overlay_png"))
            if not ok:
                errors.append(f"{response.status_code}: {response.text[:200]}")
            elif now >= measure_from and finished <= stop_at:
                done += 1
                latencies.append(finished - now)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as http:
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
    if errors:
        raise RuntimeError(f"{path}: {len(errors)} failed answers, e.g. {errors[0]}")
    ordered = sorted(latencies)
    return {
        "route": path,
        "concurrency": concurrency,
        "seconds": duration,
        "answers": done,
        "images_per_s": round(done / duration, 1),
        "p50_ms": round(1e3 * statistics.median(ordered), 1),
        "p99_ms": round(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


ROW = ("route", "concurrency", "images_per_s", "p50_ms", "p99_ms", "answers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="LUNGSERVE_MODEL_URI of a model with Grad-CAM outputs")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "lc25000-lung-768")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    images = [(p.name, p.read_bytes()) for p in sorted(args.images.glob("**/*.jpeg"))]
    if not images:
        parser.error(f"no .jpeg images under {args.images}")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "explain-bench-server.log"
    with server(args.model, {}, log) as (url, _):
        model = httpx.get(url + "/model").json()["manifest"]
        results = [
            asyncio.run(closed_loop(url, route, images, args.concurrency, args.warmup, args.duration))
            for route in ("/predict", "/explain")
        ]
    for r in results:
        print(json.dumps(r), flush=True)
    ratio = results[1]["images_per_s"] / results[0]["images_per_s"]
    command = "python loadtest/explain_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# /explain throughput beside /predict",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {model['name']} {model['version']} (input {model['input_size']} px). Images: {len(images)} files "
        f"from {args.images.name}. Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average at start "
        f"{os.getloadavg()[0]:.2f}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| route | concurrency | images/s | p50 ms | p99 ms | answers |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(str(r[k]) for k in ROW) + " |" for r in results),
        "",
        f"/explain serves {ratio:.2f}x the images/s of /predict in the same run.",
        "",
    ]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
