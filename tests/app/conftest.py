"""In-process app fixtures: the real engine on the bundled model, httpx over ASGI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from service.app import create_app
from service.core.state import ServiceState
from service.settings import Settings

# Generous: warm-up shares two cores with whatever else runs (e.g. a training job).
LIFESPAN_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _no_lungserve_env(no_lungserve_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every app test runs without the developer's LUNGSERVE_* variables, and its slide jobs
    (LUNGSERVE_JOBS_URI's default is under XDG_STATE_HOME) live in its own folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "provider": "cpu",
        "max_batch_size": 4,
        "queue_limit": 8,
        "max_files_per_request": 8,
        "preprocess_workers": 2,
        "max_file_bytes": 300_000,
        "max_request_bytes": 3_000_000,
        "max_image_pixels": 1_000_000,
        "request_deadline_s": 60.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def state(self) -> ServiceState:
        state: ServiceState = self.app.state.service
        return state


@asynccontextmanager
async def serve(settings: Settings, **client_kw: Any) -> AsyncIterator[Served]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=LIFESPAN_TIMEOUT_S, shutdown_timeout=LIFESPAN_TIMEOUT_S):
        transport = httpx.ASGITransport(app, **client_kw)
        async with httpx.AsyncClient(transport=transport, base_url="http://lungserve.test") as client:
            yield Served(app, client)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve(make_settings()) as s:
        yield s


async def post_stalled_upload(client: httpx.AsyncClient, never: asyncio.Event) -> httpx.Response:
    """POST /predict whose upload starts but never finishes (until `never` is set)."""

    async def stalled_body() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n\r\n'
        await never.wait()
        yield b""

    return await client.post(
        "/predict", content=stalled_body(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
