"""`lungserve predict` against a real server: a folder of real images, an overload that forces
retries (a stalled upload holds the one upload slot, so every chunk is refused with 503 until it
is released), answers equal to /predict's, a failed file's exit status, and a resumed run."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import socket
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.server import EXIT_TIMEOUT_S, Server, start_server, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

EVENT_TIMEOUT_S = 60.0
CLASSES = ("lung_aca", "lung_n", "lung_scc")


def predict_command(server: Server, folder: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "service.cli", "predict", str(folder),
        "--url", server.url, "--out", str(out), "--concurrency", "2", "--no-progress",
    ]  # fmt: skip


def stall_a_slot(server: Server) -> socket.socket:
    """A /predict whose upload starts and never ends: it holds an upload slot until closed."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        "POST /predict HTTP/1.1\r\nHost: lungserve\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        '--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n\r\n'
    )
    sock.sendall(head.encode())
    return sock


async def overload_refusals(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('lungserve_rejected_total{reason="queue_full"}'):
            return float(line.split()[-1])
    return 0.0


async def wait_for(predicate_name: str, check: object, timeout_s: float = EVENT_TIMEOUT_S) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {predicate_name}")


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Exit status and stderr, bounded: a hung client is killed and fails the test."""
    try:
        _, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("lungserve predict did not finish")
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)), "every file has exactly one row"
    return {r["file"]: r for r in rows}


async def test_folder_with_overload_retries_then_resumes(tmp_path: Path, lc25000: Path) -> None:
    folder = tmp_path / "slides"
    (folder / "more").mkdir(parents=True)
    first = [p for c in CLASSES for p in sorted((lc25000 / c).glob("*.jpeg"))[:3]]
    for path in first:
        shutil.copy(path, folder / path.name)
    (folder / "more" / "notes.jpeg").write_bytes(b"not an image at all")
    out = tmp_path / "results.csv"

    settings = {
        "LUNGSERVE_PROVIDER": "cpu",
        "LUNGSERVE_MAX_FILES_PER_REQUEST": "4",  # chunks of 4
        "LUNGSERVE_MAX_BATCH_SIZE": "4",
        # One body in flight at a time, and no minimum rate: the stalled upload holds the slot
        # until the test lets it go, and every chunk meanwhile gets 503 + Retry-After.
        "LUNGSERVE_MAX_UPLOADS_IN_FLIGHT": "1",
        "LUNGSERVE_MIN_UPLOAD_RATE_BYTES_S": "0",
    }
    with start_server(tmp_path, **settings) as server:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            stall = stall_a_slot(server)
            try:
                # The upload slot is held: a chunk is refused (the event, not a sleep).
                probe = [("files", (f"{i}.jpeg", b"x", "image/jpeg")) for i in range(4)]

                async def overloaded() -> bool:
                    return (await client.post("/predict-many", files=probe)).status_code == 503

                await wait_for("the stalled upload to hold its slot", overloaded)
                before = await overload_refusals(client)
                run = await asyncio.create_subprocess_exec(
                    *predict_command(server, folder, out), stdout=PIPE, stderr=PIPE
                )

                async def cli_was_refused() -> bool:
                    return await overload_refusals(client) >= before + 2 or run.returncode is not None

                await wait_for("the client's chunks to be refused", cli_was_refused)
                assert run.returncode is None, "the client must keep retrying while the server sheds load"
            finally:
                stall.close()  # the slot returns; the client's retries now get in
            returncode, err = await finish(run)
            assert returncode == 1, err  # one file is not an image
            assert "9 classified, 1 failed, 0 skipped" in err
            assert "invalid_image x1" in err
            retries = int(err.split(" retries")[0].rsplit(" ", 1)[-1])
            assert retries >= 2

            rows = read_rows(out)
            assert set(rows) == {str(folder / p.name) for p in first} | {str(folder / "more" / "notes.jpeg")}
            assert rows[str(folder / "more" / "notes.jpeg")]["error"].startswith("invalid_image: ")
            info = (await client.get("/model")).json()
            for path in first:
                row = rows[str(folder / path.name)]
                single = (await client.post("/predict", files={"file": (path.name, path.read_bytes())})).json()
                assert row["label"] == single["label"]
                assert row["model_version"] == info["manifest"]["version"]
                assert row["error"] == ""
                np.testing.assert_allclose(
                    [float(row[f"prob_{c}"]) for c in CLASSES],
                    [single["probabilities"][c] for c in CLASSES],
                    rtol=0,
                    atol=1e-5,
                )

            # Resume: three new files; the nine done ones are skipped, the failed one is tried again.
            added = [p for c in CLASSES for p in sorted((lc25000 / c).glob("*.jpeg"))[3:4]]
            for path in added:
                shutil.copy(path, folder / path.name)
            again = await asyncio.create_subprocess_exec(
                *predict_command(server, folder, out), stdout=PIPE, stderr=PIPE
            )
            returncode, err = await finish(again)
            assert returncode == 1, err
            assert "3 classified, 1 failed, 9 skipped" in err
            rows = read_rows(out)
            assert len(rows) == 13
            assert sum(1 for r in rows.values() if r["error"]) == 1


async def test_local_run_needs_no_server_and_writes_jsonl(tmp_path: Path, lc25000: Path) -> None:
    paths = [sorted((lc25000 / c).glob("*.jpeg"))[0] for c in CLASSES]
    out = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGSERVE_")}
    env["LUNGSERVE_PROVIDER"] = "cpu"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "predict", *map(str, paths), "--local", "--out", str(out),
        "--no-progress", stdout=PIPE, stderr=PIPE, env=env,
    )  # fmt: skip
    returncode, err = await finish(proc)
    assert returncode == 0, err
    assert "3 classified, 0 failed, 0 skipped" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(p) for p in paths]  # one chunk: upload order
    for row in rows:
        assert set(row["probabilities"]) == set(CLASSES)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["confidence"] == row["probabilities"][row["label"]]
        assert row["error"] is None
