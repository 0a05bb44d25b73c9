"""/analyze throughput (tiles/s) and the server's peak memory against image size.

For each input a fresh `lungserve serve` starts (this tree's code, the bundled model unless
`--model`), becomes ready, has its peak-RSS counter reset (/proc/PID/clear_refs = 5), gets
one POST /analyze, and reports the request's wall time and the process's VmHWM. Inputs are
synthetic fields of real 768 px LC25000 originals (loadtest/slides.py; every fifth block is
white glass): pyramidal tiled TIFFs, read through OpenSlide, and plain JPEGs, read through
Pillow (up to LUNGSERVE_MAX_IMAGE_PIXELS).

    .venv/bin/python loadtest/analyze_bench.py --data ../shared/data/lc25000-lung-768 --out docs/analyze

Writes results.json, RESULTS.md and memory.png (peak RSS against megapixels) into --out, plus
the class-map overlay of the first input (class-map.png). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules

from serverproc import server, status_kib  # noqa: E402
from slides import load_originals, write_plain_jpeg, write_pyramid_tiff  # noqa: E402

REQUEST_TIMEOUT_S = 1800.0


@dataclass
class Run:
    kind: str  # "pyramidal TIFF (OpenSlide)" | "plain JPEG (Pillow)"
    width: int
    height: int
    megapixels: float
    file_mib: float
    tiles: int
    tissue_tiles: int
    background_tiles: int
    seconds: float
    tiles_per_s: float
    tissue_tiles_per_s: float
    rss_ready_mib: float
    peak_rss_mib: float  # VmHWM during the request (counter reset once ready)
    reader: str


def measure(kind: str, path: Path, width: int, height: int, model: str | None, log: Path) -> tuple[Run, bytes]:
    tiles_needed = (-(-width // 768)) * (-(-height // 768))
    settings = {
        "LUNGSERVE_QUEUE_LIMIT": str(max(256, tiles_needed)),
        "LUNGSERVE_REQUEST_DEADLINE_S": str(REQUEST_TIMEOUT_S),
    }
    with server(model, settings, log) as (url, pid):
        rss_ready = status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM: measure the request only
        started = time.perf_counter()
        with path.open("rb") as fh:
            response = httpx.post(url + "/analyze", files={"file": (path.name, fh)}, timeout=REQUEST_TIMEOUT_S)
        seconds = time.perf_counter() - started
        peak = status_kib(pid, "VmHWM")
    if response.status_code != 200:
        raise RuntimeError(f"/analyze answered {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    summary = body["summary"]
    run = Run(
        kind=kind,
        width=width,
        height=height,
        megapixels=round(width * height / 1e6, 1),
        file_mib=round(path.stat().st_size / 2**20, 1),
        tiles=summary["tiles"],
        tissue_tiles=summary["tissue_tiles"],
        background_tiles=summary["background_tiles"],
        seconds=round(seconds, 2),
        tiles_per_s=round(summary["tiles"] / seconds, 1),
        tissue_tiles_per_s=round(summary["tissue_tiles"] / seconds, 1),
        rss_ready_mib=round(rss_ready / 1024, 1),
        peak_rss_mib=round(peak / 1024, 1),
        reader=body["source"]["reader"],
    )
    return run, base64.b64decode(body["overlay_png"])


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for kind, marker in (("pyramidal TIFF (OpenSlide)", "o"), ("plain JPEG (Pillow)", "s")):
        points = sorted((r.megapixels, r.peak_rss_mib) for r in runs if r.kind == kind)
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=kind)
    ready = [r.rss_ready_mib for r in runs]
    ax.axhline(sum(ready) / len(ready), color="grey", linestyle=":", label="RSS when ready (mean)")
    ax.set_xlabel("image size (megapixels)")
    ax.set_ylabel("server peak RSS during /analyze (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("/analyze memory: tiles are decoded a fixed number at a time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def report(runs: list[Run], command: str, out: Path) -> None:
    lines = [
        "# /analyze: tiles/s and peak memory",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.2f} (a shared machine: tiles/s is indicative).",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Model: the bundled one unless stated. "
        "Each row is one fresh server and one request; wall time includes the upload over loopback.",
        "",
        "| input | size | MP | file MiB | tiles (tissue / background) | s | tiles/s | tissue tiles/s "
        "| RSS ready MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.kind} | {r.width}x{r.height} | {r.megapixels} | {r.file_mib} | {r.tiles} "
            f"({r.tissue_tiles} / {r.background_tiles}) | {r.seconds} | {r.tiles_per_s} | {r.tissue_tiles_per_s} "
            f"| {r.rss_ready_mib} | {r.peak_rss_mib} |"
        )
    lines += ["", "![peak RSS against image size](memory.png)", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lc25000-lung-768")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "analyze")
    parser.add_argument("--model", help="LUNGSERVE_MODEL_URI (default: the bundled model)")
    parser.add_argument("--tiff-sides", default="3072,6144,10240", help="square pyramidal TIFF sides, px")
    parser.add_argument("--jpeg-sides", default="3072,6144", help="square plain JPEG sides, px (<= the pixel limit)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    originals = load_originals(args.data)
    log = Path(tempfile.gettempdir()) / "analyze-bench-servers.log"
    log.write_text("")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="analyze-bench-") as tmp:
        inputs: list[tuple[str, Path, int]] = []
        for side in (int(s) for s in args.tiff_sides.split(",") if s):
            inputs.append(("pyramidal TIFF (OpenSlide)", Path(tmp) / f"field-{side}.tif", side))
        for side in (int(s) for s in args.jpeg_sides.split(",") if s):
            inputs.append(("plain JPEG (Pillow)", Path(tmp) / f"field-{side}.jpeg", side))
        for i, (kind, path, side) in enumerate(inputs):
            if path.suffix == ".tif":
                write_pyramid_tiff(path, originals, side, side)
            else:
                write_plain_jpeg(path, originals, side, side)
            run, overlay = measure(kind, path, side, side, args.model, log)
            path.unlink()
            runs.append(run)
            print(json.dumps(asdict(run)), flush=True)
            if i == 0:
                (args.out / "class-map.png").write_bytes(overlay)
    command = "python loadtest/analyze_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    plot(runs, args.out / "memory.png")
    report(runs, command, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
