"""/docs and /redoc render in a real headless Chromium that can reach nothing but 127.0.0.1:
the interactive docs need no internet (hospital networks often have none)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.e2e.chromium import OFFLINE_FLAGS
from tests.e2e.server import EXIT_TIMEOUT_S, Server, start_server, wait_ready
from tests.system_tools import require_tool

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


async def rendered_dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, fetched with every host but loopback unresolvable."""
    proc = await asyncio.create_subprocess_exec(
        chromium,
        *OFFLINE_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"chromium did not finish rendering {url}")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def docs_of(server: Server, chromium: str, tmp_path: Path, page: str) -> str:
    return await rendered_dom(chromium, server.url + page, tmp_path / f"profile{page.replace('/', '-')}")


async def test_swagger_ui_and_redoc_render_offline(tmp_path: Path) -> None:
    chromium = require_tool("chromium", "chromium")
    with start_server(tmp_path, LUNGSERVE_PROVIDER="cpu", LUNGSERVE_ADMIN_TOKEN="docs-test-token") as server:
        await wait_ready(server)

        swagger = await docs_of(server, chromium, tmp_path, "/docs")
        # Swagger UI built one block per operation from /openapi.json: its JS, CSS and the schema loaded.
        paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', swagger))
        assert {"/predict", "/predict-many", "/v2/models/{name}/infer", "/admin/reload"} <= paths
        assert "btn authorize" in swagger  # a security scheme is declared (the admin bearer)

        redoc = await docs_of(server, chromium, tmp_path, "/redoc")
        assert "Classify one image" in redoc
        assert "Open Inference Protocol v2" in redoc
