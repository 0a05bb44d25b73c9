"""A/B of lungserve builds: servers from several source trees, measured in alternating rounds.

    .venv/bin/python loadtest/ab.py TREE_A,TREE_B[+LUNGSERVE_X=V...] [--rounds 3] [-c 32] [-d 6]

Each tree (a checkout; `+NAME=VALUE` adds environment) is started with `python -m service.cli
serve` on 127.0.0.1 and loaded in turn with wrk (loadtest/wrk_multipart.lua, `POST /predict`,
the 768 px originals), A B A B ..., so a drifting machine hits both alike. Per round: images/s,
p99 and the server's CPU milliseconds per answered image (user + system time of the server's
process tree over the round / images): the figure that stays comparable on a noisy machine. Medians at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wrk(port: int, concurrency: int, seconds: int, files: list[str]) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "60s",
        "-s",
        str(ROOT / "loadtest" / "wrk_multipart.lua"),
        f"http://127.0.0.1:{port}",
        "--",
        "/predict",
        "file",
        *files,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRK_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    return result


def _tree(ps: psutil.Process) -> list[psutil.Process]:
    # Several processes (LUNGSERVE_WORKERS > 1): the supervisor, its fronts and model process.
    return [ps, *ps.children(recursive=True)]


def tree_cpu_s(ps: psutil.Process) -> float:
    total = 0.0
    for p in _tree(ps):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(p.cpu_times()[:2])
    return total


def tree_rss_bytes(ps: psutil.Process) -> int:
    total = 0
    for p in _tree(ps):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += int(p.memory_info().rss)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", help="comma-separated source trees, each optionally +NAME=VALUE+...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("-d", "--duration", type=int, default=6, help="seconds per round and tree")
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "lc25000-lung-768")
    args = p.parse_args(argv)
    files = sorted(str(f) for f in args.images.rglob("*.jpeg"))
    servers: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    try:
        for spec in args.trees.split(","):
            tree, *extra = spec.split("+")
            env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGSERVE_")}
            env["PYTHONPATH"] = tree
            env["LUNGSERVE_WORKERS"] = "1"  # one process each, unless +LUNGSERVE_WORKERS=N says otherwise
            env.update(kv.split("=", 1) for kv in extra)
            port = free_port()
            cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append((spec, port, proc))
        for spec, port, proc in servers:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"ab: {spec} did not become ready")
                time.sleep(0.5)
            wrk(port, args.concurrency, 3, files)  # warm-up
        rows: dict[str, list[tuple[float, float, float, float]]] = {spec: [] for spec, _, _ in servers}
        for r in range(args.rounds):
            for spec, port, proc in servers:
                ps = psutil.Process(proc.pid)
                before = tree_cpu_s(ps)
                d = wrk(port, args.concurrency, args.duration, files)
                cpu = tree_cpu_s(ps) - before
                ok = int(d["ok_bodies"])
                row = (
                    ok / (d["duration_us"] / 1e6),
                    d["latency_us"]["p99"] / 1e3,
                    cpu / max(ok, 1) * 1e3,
                    tree_rss_bytes(ps) / 2**20,
                )
                rows[spec].append(row)
                print(
                    f"round {r} {spec}: {row[0]:.1f} img/s, p99 {row[1]:.1f} ms, {row[2]:.2f} ms CPU/image, "
                    f"RSS {row[3]:.0f} MiB",
                    flush=True,
                )
        for spec, values in rows.items():
            print(
                f"median {spec}: {statistics.median(v[0] for v in values):.1f} img/s, "
                f"p99 {statistics.median(v[1] for v in values):.1f} ms, "
                f"{statistics.median(v[2] for v in values):.2f} ms CPU/image, "
                f"RSS max {max(v[3] for v in values):.0f} MiB"
            )
    finally:
        for _, _, proc in servers:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
