"""Slide jobs: tiles/s alone and beside /predict load, /predict p99 idle vs during a job, RSS, cancel, restart.

One `lungserve serve` of this tree (the bundled model, CPU) and a 604 Mpx slide made here
(24,576 px square tiled zlib BigTIFF, tests/slides.py) with `--cells` tissue cells of real
LC25000 tiles of known class, the rest white glass. In order:

1. /predict alone: closed loop at concurrency `--concurrency` for `--seconds` (p50/p99);
2. a job alone: tiles/s, peak RSS of the server's process tree over its idle RSS;
3. a job beside the same /predict loop: both again (p99 during the job against idle);
4. cancel: a job cancelled while running ends `cancelled`;
5. SIGTERM mid-job and a restart: the job ends `done` with every tissue tile listed.

Each done job is checked: every tissue tile listed, the share carrying its source's label, the
GeoJSON's feature count, progress only going up.

    .venv/bin/python loadtest/slide_job.py --data ../shared/data/lc25000-lung --out docs/jobs

Writes results.json and RESULTS.md into --out. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs; a few calls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import free_port  # noqa: E402

from tests.slides import CELL, cell_image, spread, write_slide  # noqa: E402

SIDE = 24_576
CLASSES = ("lung_aca", "lung_n", "lung_scc")


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # gone between the listing and the read
            total += child.memory_info().rss
    return float(total) / 2**20


class Server:
    """`lungserve serve` on a free port; restartable on the same jobs folder."""

    def __init__(self, jobs: Path, log: Path) -> None:
        self.jobs, self.log = jobs, log
        self.proc: Any = None
        self.url = ""

    async def start(self) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGSERVE_")}
        env.update(
            PYTHONPATH=str(ROOT),
            LUNGSERVE_PROVIDER="cpu",
            LUNGSERVE_LOG_LEVEL="WARNING",
            LUNGSERVE_JOBS_URI=str(self.jobs),
            LUNGSERVE_SHUTDOWN_DELAY_S="0",
            LUNGSERVE_WORKERS="1",  # one process, as in the runs it reported
        )
        out = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            stdout=out, stderr=out, env=env, cwd=ROOT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            for _ in range(900):
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"server not ready; see {self.log}")

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return int(await self.proc.wait())


async def predict_loop(url: str, tiles: list[bytes], concurrency: int, stop: asyncio.Event) -> list[float]:
    latencies: list[float] = []

    async def user(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
            n = i
            while not stop.is_set():
                started = time.perf_counter()
                response = await client.post(
                    "/predict", files={"file": ("t.jpeg", tiles[n % len(tiles)], "image/jpeg")}
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                n += concurrency

    await asyncio.gather(*(user(i) for i in range(concurrency)))
    return latencies


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


async def run_job(server: Server, slide: Path, *, until: Any = None) -> dict[str, Any]:
    """Submit, poll every 0.25 s until done (or `until(status)`), sampling RSS; the job's figures."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120.0) as client:
        with slide.open("rb") as fh:
            response = await client.post("/jobs", files={"file": ("slide.tif", fh, "image/tiff")})
        response.raise_for_status()
        job_id = response.json()["id"]
        return await follow(server, client, job_id, until=until)


async def follow(server: Server, client: httpx.AsyncClient, job_id: str, *, until: Any = None) -> dict[str, Any]:
    seen: list[tuple[float, int, str]] = []
    peak = 0.0
    while True:
        status = (await client.get(f"/jobs/{job_id}")).json()
        seen.append((time.monotonic(), status["progress"]["tiles_done"], status["state"]))
        peak = max(peak, tree_rss_mib(server.proc.pid))
        if status["state"] in ("done", "failed", "cancelled") or (until is not None and until(status)):
            break
        await asyncio.sleep(0.25)
    running = [(t, n) for t, n, state in seen if state == "running" and n > 0]
    done = [n for _, n, _ in seen]
    figures: dict[str, Any] = {
        "id": job_id,
        "state": seen[-1][2],
        "tiles_total": status["progress"]["tiles_total"],
        "peak_tree_rss_mib": round(peak, 1),
        "progress_only_goes_up": done == sorted(done),
    }
    if len(running) >= 2 and running[-1][0] > running[0][0]:
        figures["tiles_per_s"] = round((running[-1][1] - running[0][1]) / (running[-1][0] - running[0][0]), 1)
    return figures


async def check_result(url: str, job_id: str, truth: dict[tuple[int, int], str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        result = (await client.get(f"/jobs/{job_id}/result")).json()
        features = (await client.get(f"/jobs/{job_id}/result.geojson")).json()["features"]
    labels = {(t["x"], t["y"]): t["label"] for t in result["tiles"]}
    return {
        "tissue_tiles_listed": sum(xy in labels for xy in truth),
        "tissue_tiles_expected": len(truth),
        "extra_tiles": len(set(labels) - set(truth)),
        "own_label_share": round(sum(labels.get(xy) == label for xy, label in truth.items()) / len(truth), 3),
        "geojson_features": len(features),
        "referred_tiles": result["summary"]["referred_tiles"],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="slide-job-"))
    places = spread(args.cells, SIDE // CELL, SIDE // CELL, seed=11)
    sources = [p for c in CLASSES for p in sorted((args.data / c).glob("*.jpeg"))[1000 : 1000 + args.cells]]
    chosen = [sources[(i % 3) * args.cells + i // 3] for i in range(args.cells)]
    truth = {(c * CELL, r * CELL): p.parent.name for (c, r), p in zip(places, chosen, strict=True)}
    slide = write_slide(
        work / "slide.tif", SIDE, SIDE, {pl: cell_image(p) for pl, p in zip(places, chosen, strict=True)}
    )
    tiles = [p.read_bytes() for p in chosen[:32]]
    mib = round(slide.stat().st_size / 2**20, 1)
    out: dict[str, Any] = {"slide": {"megapixels": round(SIDE * SIDE / 1e6), "cells": args.cells, "file_mib": mib}}
    out["load_average"] = os.getloadavg()[0]
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    server = Server(work / "jobs", work / "serve.log")
    await server.start()
    out["idle_tree_rss_mib"] = round(tree_rss_mib(server.proc.pid), 1)

    stop = asyncio.Event()
    loop = asyncio.ensure_future(predict_loop(server.url, tiles, args.concurrency, stop))
    await asyncio.sleep(args.seconds)  # a fixed measuring window, not a synchronisation
    stop.set()
    out["predict_idle"] = percentiles(await loop)

    alone = await run_job(server, slide)
    alone["check"] = await check_result(server.url, alone["id"], truth)
    out["job_alone"] = alone

    stop = asyncio.Event()
    loop = asyncio.ensure_future(predict_loop(server.url, tiles, args.concurrency, stop))
    beside = await run_job(server, slide)
    stop.set()
    out["predict_during_job"] = percentiles(await loop)
    beside["check"] = await check_result(server.url, beside["id"], truth)
    out["job_beside_predict"] = beside

    running = await run_job(server, slide, until=lambda s: s["state"] == "running" and s["progress"]["tiles_done"] > 50)
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
        out["cancel"] = (await client.delete(f"/jobs/{running['id']}")).json()["state"]

    interrupted = await run_job(server, slide, until=lambda s: s["progress"]["tiles_done"] >= 300)
    out["sigterm_exit_code"] = await server.stop()
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
        resumed = await follow(server, client, interrupted["id"])
    resumed["check"] = await check_result(server.url, interrupted["id"], truth)
    out["after_restart"] = resumed
    await server.stop()
    return out


def report(out: dict[str, Any], command: str, folder: Path) -> None:
    a, b = out["job_alone"], out["job_beside_predict"]
    idle, busy = out["predict_idle"], out["predict_during_job"]
    slide, ca, cb = out["slide"], a["check"], b["check"]
    lines = [
        "# Slide jobs: tiles/s, /predict latency beside a job, memory",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average at start {out['load_average']:.2f} "
        f"(shared with other work: figures are indicative). Date: {out['date']}.",
        f"Slide: {SIDE}x{SIDE} px ({slide['megapixels']} Mpx, {slide['file_mib']} MiB zlib-tiled BigTIFF), "
        f"{slide['cells']} tissue cells of real LC25000 tiles, the rest glass; 1,024 tiles of 768 px.",
        "",
        "| | tiles/s | peak RSS of the server tree (MiB) | own-label share | every tissue tile listed |",
        "|---|---|---|---|---|",
        f"| job alone | {a.get('tiles_per_s')} | {a['peak_tree_rss_mib']} (idle {out['idle_tree_rss_mib']}) | "
        f"{ca['own_label_share']} | {ca['tissue_tiles_listed']}/{ca['tissue_tiles_expected']} |",
        f"| job beside /predict c={args_concurrency(out)} | {b.get('tiles_per_s')} | {b['peak_tree_rss_mib']} | "
        f"{cb['own_label_share']} | {cb['tissue_tiles_listed']}/{cb['tissue_tiles_expected']} |",
        "",
        "| /predict | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| idle | {idle['requests']} | {idle['p50_ms']} | {idle['p99_ms']} |",
        f"| during a job | {busy['requests']} | {busy['p50_ms']} | {busy['p99_ms']} |",
        "",
        f"p99 during a job / idle: {busy['p99_ms'] / idle['p99_ms']:.2f}x. Cancel while running: `{out['cancel']}`. "
        f"SIGTERM mid-job: exit {out['sigterm_exit_code']}; after the restart the job ended "
        f"`{out['after_restart']['state']}` with {out['after_restart']['check']['tissue_tiles_listed']} of "
        f"{out['after_restart']['check']['tissue_tiles_expected']} tissue tiles.",
        "",
    ]
    (folder / "RESULTS.md").write_text("\n".join(lines))


def args_concurrency(out: dict[str, Any]) -> int:
    return int(out.get("concurrency", 4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lc25000-lung")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "jobs")
    parser.add_argument("--cells", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="the idle /predict window")
    args = parser.parse_args(argv)
    out = asyncio.run(main_async(args))
    out["concurrency"] = args.concurrency
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    report(out, "python loadtest/slide_job.py " + " ".join(argv if argv is not None else sys.argv[1:]), args.out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
