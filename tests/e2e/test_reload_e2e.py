"""A real `lungserve serve` process serving from a real S3 endpoint (moto), reloaded under load.

Synchronisation is on events only: the server's startup log line (its port), its readiness
endpoint, answers observed by the clients, and log lines.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from export.upload import upload
from service.model.source import S3Options, current_etag
from tests.e2e.server import ONE_PROCESS
from tests.images import noise_png
from tests.onnx_models import manifest_for, model_bytes, write_model_dir
from tests.s3fixtures import LoggedProcess, MotoServer, boto3_client

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BIAS = {"v1": [3.0, 0.0, 0.0], "v2": [0.0, 3.0, 0.0]}
LABEL = {"v1": "lung_aca", "v2": "lung_n"}
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
STARTUP_TIMEOUT_S = 120.0


async def publish(moto: MotoServer, tmp_path: Path, uri: str, version: str) -> None:
    write_model_dir(tmp_path / version, version=version, bias=BIAS[version])
    await upload(tmp_path / version, uri, s3=S3Options(endpoint_url=moto.url))


def server_env(moto: MotoServer, uri: str, cache: Path, **extra: str) -> dict[str, str]:
    return {
        "LUNGSERVE_MODEL_URI": uri,
        "LUNGSERVE_S3_ENDPOINT_URL": moto.url,
        "LUNGSERVE_MODEL_CACHE_DIR": str(cache),
        "LUNGSERVE_ADMIN_TOKEN": TOKEN,
        "LUNGSERVE_PROVIDER": "cpu",
        "LUNGSERVE_MAX_BATCH_SIZE": "4",
        "LUNGSERVE_PREPROCESS_WORKERS": "2",
        **ONE_PROCESS,
        **extra,
    }


@pytest.fixture
def start_server(aws_env: None) -> Iterator[Any]:
    """Start `lungserve serve --port 0` with extra env; yields (process, base URL) once listening."""
    started: list[LoggedProcess] = []

    def start(env: dict[str, str]) -> tuple[LoggedProcess, str]:
        proc = LoggedProcess(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0"], env=env, cwd=ROOT
        )
        started.append(proc)
        match = _LISTENING.search(proc.wait_for_line(_LISTENING, timeout_s=STARTUP_TIMEOUT_S))
        assert match is not None
        return proc, f"http://127.0.0.1:{match.group(1)}"

    yield start
    for proc in started:
        proc.stop()


async def ready_version(client: httpx.AsyncClient) -> str:
    r = await client.get("/health/ready")
    assert r.status_code == 200, r.text
    version: str = r.json()["model"]["version"]
    return version


async def test_reload_under_concurrent_load(moto: MotoServer, bucket: str, tmp_path: Path, start_server: Any) -> None:
    uri = f"s3://{bucket}/lung/"
    await publish(moto, tmp_path, uri, "v1")
    proc, url = start_server(server_env(moto, uri, tmp_path / "cache"))

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        assert await ready_version(client) == "v1"  # listening implies the lifespan finished
        model = (await client.get("/model")).json()
        assert model["source"]["source"] == uri
        assert model["source"]["etag"] == await current_etag(uri, s3=S3Options(endpoint_url=moto.url))

        answers: list[tuple[int, bool, int, str | None, str | None]] = []  # client, after, status, version, label
        v1_seen = asyncio.Event()
        reloaded = asyncio.Event()
        n_clients = 8
        done_after_reload: set[int] = set()
        all_done = asyncio.Event()

        async def client_loop(i: int) -> None:
            seed = 0
            while True:
                after = reloaded.is_set()
                r = await client.post("/predict", files={"file": (f"{i}.png", noise_png(24, seed), "image/png")})
                seed += 1
                body = r.json() if r.status_code == 200 else {}
                version = body.get("model", {}).get("version")
                answers.append((i, after, r.status_code, version, body.get("label")))
                if sum(1 for a in answers if a[3] == "v1") >= 2 * n_clients:
                    v1_seen.set()
                if after and version == "v2":
                    done_after_reload.add(i)
                    if len(done_after_reload) == n_clients:
                        all_done.set()
                    return

        with anyio.fail_after(180):
            clients = [asyncio.create_task(client_loop(i)) for i in range(n_clients)]
            await v1_seen.wait()  # load is flowing on v1
            await publish(moto, tmp_path, uri, "v2")
            r = await client.post("/admin/reload", headers=AUTH)
            reloaded.set()
            await asyncio.gather(*clients)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloaded"
        assert (r.json()["previous"]["version"], r.json()["current"]["version"]) == ("v1", "v2")

        failed = [a for a in answers if a[2] != 200]
        assert failed == [], failed  # zero failed requests across the swap
        assert all(label == LABEL[version] for *_, version, label in answers if version)  # computed by that version
        assert {a[3] for a in answers if not a[1]} >= {"v1"}
        assert {a[3] for a in answers if a[1]} == {"v2"}  # every request started after the reload is v2
        assert all_done.is_set()

        # /model names the new version and its ETag.
        model = (await client.get("/model")).json()
        assert model["manifest"]["version"] == "v2"
        assert model["source"]["etag"] == await current_etag(uri, s3=S3Options(endpoint_url=moto.url))

        # A new manifest whose model does not match it is refused; v2 keeps serving.
        s3 = boto3_client("s3", moto.url)
        good = model_bytes(bias=[0.0, 0.0, 3.0])
        s3.put_object(Bucket=bucket, Key="lung/model.onnx", Body=good + b"tampered")
        s3.put_object(Bucket=bucket, Key="lung/model.json", Body=manifest_for_json(good, "v3"))
        r = await client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "model_rejected"
        assert "checksum mismatch" in r.json()["error"]["message"]
        assert await ready_version(client) == "v2"

        # Admin API auth.
        assert (await client.post("/admin/reload")).status_code == 401

    proc.proc.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(proc.wait_exit) == 0


def manifest_for_json(data: bytes, version: str) -> bytes:
    import json

    return json.dumps(manifest_for(data, version=version)).encode()


async def test_poller_picks_up_a_new_upload_and_skips_a_bad_one(
    moto: MotoServer, bucket: str, tmp_path: Path, start_server: Any
) -> None:
    uri = f"s3://{bucket}/polled/"
    await publish(moto, tmp_path, uri, "v1")
    proc, url = start_server(server_env(moto, uri, tmp_path / "cache", LUNGSERVE_MODEL_POLL_INTERVAL_S="0.2"))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        assert await ready_version(client) == "v1"
        await publish(moto, tmp_path, uri, "v2")
        await anyio.to_thread.run_sync(lambda: proc.wait_for_line(r"reload: now serving tiny v2", timeout_s=120))
        assert await ready_version(client) == "v2"

        start = proc.log_position()
        junk = b"not a model"
        s3 = boto3_client("s3", moto.url)
        s3.put_object(Bucket=bucket, Key="polled/model.onnx", Body=junk)
        s3.put_object(Bucket=bucket, Key="polled/model.json", Body=manifest_for_json(junk, "v3"))
        line = await anyio.to_thread.run_sync(
            lambda: proc.wait_for_line(r"reload refused, still serving v2", start=start, timeout_s=120)
        )
        assert "not a loadable ONNX model" in line
        assert await ready_version(client) == "v2"


async def test_startup_fails_with_a_one_line_cause_and_nonzero_exit(
    moto: MotoServer, aws_env: None, tmp_path: Path
) -> None:
    env = server_env(moto, "s3://no-such-bucket-lungserve/lung/", tmp_path / "cache")
    proc = LoggedProcess(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0"], env=env, cwd=ROOT
    )
    try:
        code = await anyio.to_thread.run_sync(proc.wait_exit)
        assert code != 0
        line = proc.wait_for_line(r"model not loaded from")
        assert "bucket 'no-such-bucket-lungserve' does not exist" in line
    finally:
        proc.stop()
