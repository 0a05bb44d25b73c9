"""/page/config.json: what the browser page learns about the model besides its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.app.conftest import make_settings, serve
from tests.onnx_models import write_model_v2_dir

pytestmark = pytest.mark.anyio

ESTIMATE = {
    "accuracy": 0.974,
    "interval": [0.963, 0.984],
    "recall": {"lung_aca": 0.962, "lung_n": 1.0, "lung_scc": 0.962},
    "method": "5-fold grouped CV, out-of-fold",
    "groups": 611,
    "images": 12377,  # an extra key: kept in model.json, not sent to the page
}


async def page_config(model_dir: Path) -> dict[str, Any]:
    async with serve(make_settings(model_uri=str(model_dir))) as served:
        r = await served.client.get("/page/config.json")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_the_page_gets_the_published_estimate(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "model", estimate=ESTIMATE)
    config = await page_config(tmp_path / "model")
    assert config["estimate"] == {
        "accuracy": 0.974,
        "interval": [0.963, 0.984],
        "method": "5-fold grouped CV, out-of-fold",
        "groups": 611,
    }
    assert config["model"] == {"name": "tiny", "version": "2"}


async def test_a_model_without_an_estimate_says_so(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "model")  # no "estimate" in its manifest
    config = await page_config(tmp_path / "model")
    assert config["estimate"] is None
