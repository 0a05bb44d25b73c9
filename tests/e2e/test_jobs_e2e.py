"""A slide job in a real `lungserve serve`: SIGTERM mid-job, restart, the job finishes from its checkpoints.

The slide is a 24,576 px square tiled BigTIFF (1,024 tiles of 768 px) made here from a tile
generator, with tissue cells of real LC25000 tiles (synthetic noise where the data is absent).
The test synchronises on the job state endpoint and on the process exit, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LC25000
from tests.e2e.server import EXIT_TIMEOUT_S, start_server, wait_ready
from tests.images import noise
from tests.slides import CELL, cell_image, spread, write_slide

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

SIDE = 24_576
GRID = SIDE // CELL  # 32 x 32 tiles
TISSUE = 60
SAFETY_S = 600.0


def _cells() -> dict[tuple[int, int], Any]:
    places = spread(TISSUE, GRID, GRID, seed=7)
    tiles = [p for c in ("lung_aca", "lung_n", "lung_scc") for p in sorted((LC25000 / c).glob("*.jpeg"))[:20]]
    if len(tiles) == TISSUE:
        return {place: cell_image(path) for place, path in zip(places, tiles, strict=True)}
    return {place: np.asarray(noise(CELL, seed=i)) for i, place in enumerate(places)}


async def _status(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _poll(client: httpx.AsyncClient, job_id: str, until: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(SAFETY_S):
        while not seen or not until(seen[-1]):
            seen.append(await _status(client, job_id))
            await asyncio.sleep(0.05)
    return seen


def _tiles_counted(metrics_text: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(metrics_text)
        for s in f.samples
        if s.name == "lungserve_job_tiles_total"
    )


async def test_a_job_survives_sigterm_and_a_restart_without_redoing_tiles(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "slide.tif", SIDE, SIDE, _cells())
    jobs = tmp_path / "jobs"
    env = {
        "LUNGSERVE_PROVIDER": "cpu",
        "LUNGSERVE_JOBS_URI": str(jobs),
        "LUNGSERVE_JOBS_CHECKPOINT_TILES": "32",
        "LUNGSERVE_SHUTDOWN_DELAY_S": "0",
        "LUNGSERVE_LOG_LEVEL": "WARNING",
    }
    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            with slide.open("rb") as fh:
                response = await client.post("/jobs", files={"file": ("slide.tif", fh, "image/tiff")})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            before = await _poll(client, job_id, lambda s: s["progress"]["tiles_done"] >= 100)
            assert before[-1]["state"] == "running", before[-1]  # 10% of 1,024 tiles: far from done
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(EXIT_TIMEOUT_S) == 0, server.output()

    record = json.loads((jobs / job_id / "job.json").read_text())
    assert record["state"] == "queued"  # waits to resume
    checkpointed = record["tiles_done"]
    assert checkpointed >= before[-1]["progress"]["tiles_done"]  # every finished tile was kept

    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            after = await _poll(client, job_id, lambda s: s["state"] in ("done", "failed", "cancelled"))
            assert after[-1]["state"] == "done", after[-1]
            done = [s["progress"]["tiles_done"] for s in before + after]
            assert done == sorted(done)  # progress only goes up, across the restart
            assert after[-1]["progress"] == {"tiles_done": GRID * GRID, "tiles_total": GRID * GRID}
            # The second server read only what the checkpoints lacked: no tile twice.
            assert _tiles_counted((await client.get("/metrics")).text) == GRID * GRID - checkpointed
            result = (await client.get(f"/jobs/{job_id}/result")).json()
            assert result["summary"]["tissue_tiles"] == TISSUE
            assert len(result["tiles"]) == TISSUE
