"""POST /admin/reload in-process: auth, swap under concurrent requests, refusal of a bad model.

The model source is a local folder rewritten between calls (the S3 path is covered in
tests/e2e/test_reload_e2e.py); engine, batcher and warm-up are the real ones.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.conftest import make_settings, serve
from tests.images import noise_jpeg
from tests.onnx_models import model_bytes, write_model_dir

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BIAS = {"v1": [3.0, 0.0, 0.0], "v2": [0.0, 3.0, 0.0]}  # v1 answers lung_aca, v2 lung_n


def write(folder: Path, version: str) -> None:
    write_model_dir(folder, version=version, bias=BIAS[version])


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code
    return error


async def predict(client: httpx.AsyncClient) -> tuple[int, str | None, str | None]:
    r = await client.post("/predict", files={"file": ("x.jpeg", noise_jpeg(32))})
    if r.status_code != 200:
        return r.status_code, None, None
    body = r.json()
    return 200, body["model"]["version"], body["label"]


async def test_admin_api_is_absent_without_a_token(tmp_path: Path) -> None:
    write(tmp_path / "m", "v1")
    async with serve(make_settings(model_uri=str(tmp_path / "m"))) as s:
        assert_error(await s.client.post("/admin/reload", headers=AUTH), 404, "not_found")


async def test_admin_token_is_required(tmp_path: Path) -> None:
    write(tmp_path / "m", "v1")
    async with serve(make_settings(model_uri=str(tmp_path / "m"), admin_token=TOKEN)) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = await s.client.post("/admin/reload", headers=headers)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        r = await s.client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "unchanged"


async def test_reload_swaps_under_concurrent_requests_and_refuses_a_bad_model(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write(folder, "v1")
    settings = make_settings(model_uri=str(folder), admin_token=TOKEN, queue_limit=64, max_files_per_request=8)
    async with serve(settings) as s:
        assert await predict(s.client) == (200, "v1", "lung_aca")

        write(folder, "v2")
        stop = asyncio.Event()
        reloaded = asyncio.Event()
        answers: list[tuple[bool, int, str | None, str | None]] = []  # (started after reload, status, version, label)

        async def client_loop() -> None:
            while not stop.is_set():
                after = reloaded.is_set()
                answers.append((after, *await predict(s.client)))
                if after:
                    stop.set()

        clients = [asyncio.create_task(client_loop()) for _ in range(6)]
        r = await s.client.post("/admin/reload", headers=AUTH)
        reloaded.set()
        await asyncio.gather(*clients)

        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "reloaded"
        assert (body["previous"]["version"], body["current"]["version"]) == ("v1", "v2")
        assert [a for a in answers if a[1] != 200] == []  # no request failed because of the swap
        assert {(v, label) for _, _, v, label in answers} <= {("v1", "lung_aca"), ("v2", "lung_n")}
        assert all(v == "v2" for after, _, v, _ in answers if after)

        # A broken model is refused with its cause; v2 keeps serving.
        (folder / "model.onnx").write_bytes(model_bytes(bias=[0.0, 0.0, 3.0]))  # sha256 no longer matches
        error = assert_error(await s.client.post("/admin/reload", headers=AUTH), 409, "model_rejected")
        assert "checksum mismatch" in error["message"]
        assert "still serving version v2" in error["message"]
        assert await predict(s.client) == (200, "v2", "lung_n")

        model = (await s.client.get("/model")).json()
        assert model["manifest"]["version"] == "v2"
        assert model["source"]["version"] == "v2"
