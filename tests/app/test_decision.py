"""The refer decision through the real app: thresholds from the manifest, their overrides
(LUNGSERVE_REFER_BELOW, LUNGSERVE_OOD_ABOVE), the ood_score output, and the metric.

The model is the tiny v2 test graph (tests/onnx_models.py): every output of the v2 contract, its
three probabilities all 1/3 (so its confidence is 1/3), its ood_score the distance of the image's
mean colour from a fixed centre. Its images are synthetic, so nothing here needs ../shared/data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.model.manifest import Manifest
from tests.app.conftest import Served, make_settings, serve
from tests.onnx_models import write_model_v2_dir
from tests.ood_images import encode, he_like_tile

pytestmark = pytest.mark.anyio

TILE = encode(he_like_tile(0), "PNG")  # passes the tissue check
WHITE = encode(he_like_tile(0) * 0 + 255, "PNG")  # empty glass: fails it
CONFIDENCE = 1 / 3  # the tiny model's
DECISION = {"refer_below": 0.25, "ood_above": 1000.0, "coverage": 0.9, "accuracy": 0.99}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_model_v2_dir(tmp_path / "model", decision=DECISION)
    return tmp_path / "model"


@asynccontextmanager
async def serving(model_dir: Path, **overrides: Any) -> AsyncIterator[Served]:
    async with serve(make_settings(model_uri=str(model_dir), **overrides)) as served:
        yield served


async def predict(served: Served, data: bytes) -> dict[str, Any]:
    r = await served.client.post("/predict", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def decisions_total(served: Served) -> dict[tuple[str, str], float]:
    """lungserve_decisions_total as /metrics exposes it."""
    text = (await served.client.get("/metrics")).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "lungserve_decisions")
    return {(s.labels["decision"], s.labels["reason"]): s.value for s in family.samples if s.name.endswith("_total")}


async def test_manifest_thresholds_accept_a_plausible_tile_and_refer_glass(model_dir: Path) -> None:
    async with serving(model_dir) as served:
        body = await predict(served, TILE)
        assert body["confidence"] == pytest.approx(CONFIDENCE, abs=1e-6)
        assert (body["decision"], body["reason"]) == ("accept", None)
        body = await predict(served, WHITE)
        assert (body["decision"], body["reason"]) == ("refer", "out_of_distribution")
        info = (await served.client.get("/model")).json()
        assert info["decision"] == {"refer_below": 0.25, "ood_above": 1000.0, "ood_score": True, "tissue_check": True}


async def test_lungserve_refer_below_overrides_the_manifest(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGSERVE_REFER_BELOW", "0.5")  # above the tiny model's confidence of 1/3
    async with serving(model_dir) as served:
        body = await predict(served, TILE)
        assert (body["decision"], body["reason"]) == ("refer", "low_confidence")
        assert (await served.client.get("/model")).json()["decision"]["refer_below"] == 0.5


async def test_lungserve_ood_above_overrides_the_manifest(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGSERVE_OOD_ABOVE", "1.0")  # the tile's mean colour is further than that from the centre
    async with serving(model_dir) as served:
        body = await predict(served, TILE)
        assert (body["decision"], body["reason"]) == ("refer", "out_of_distribution")


async def test_lungserve_tissue_check_false_leaves_the_decision_to_the_model(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUNGSERVE_TISSUE_CHECK", "false")
    async with serving(model_dir) as served:
        # Glass passes now: confident enough for refer_below=0.25, and near enough for ood_above=1000.
        assert (await predict(served, WHITE))["decision"] == "accept"
        assert (await served.client.get("/model")).json()["decision"]["tissue_check"] is False


async def test_a_model_without_decision_section_refers_only_what_the_tissue_check_rejects(tmp_path: Path) -> None:
    write_model_v2_dir(tmp_path / "m")  # no "decision" in its manifest
    async with serving(tmp_path / "m") as served:
        assert Manifest.read(tmp_path / "m" / "model.json").decision is None
        assert (await predict(served, TILE))["decision"] == "accept"
        assert (await predict(served, WHITE))["reason"] == "out_of_distribution"


async def test_predict_many_carries_a_decision_per_file(model_dir: Path) -> None:
    files = [
        ("files", ("tile.png", TILE, "image/png")),
        ("files", ("glass.png", WHITE, "image/png")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
    ]
    async with serving(model_dir, refer_below=0.5) as served:
        r = await served.client.post("/predict-many", files=files)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [(x.get("decision"), x.get("reason")) for x in results] == [
            ("refer", "low_confidence"),
            ("refer", "out_of_distribution"),
            (None, None),  # an error has no decision
        ]


async def test_decisions_are_counted_exactly(model_dir: Path) -> None:
    async with serving(model_dir) as served:
        before = await decisions_total(served)
        assert before == {
            ("accept", "none"): 0.0,
            ("refer", "low_confidence"): 0.0,
            ("refer", "out_of_distribution"): 0.0,
        }
        for data in (TILE, TILE, WHITE):
            await predict(served, data)
        files = [("files", ("a.png", TILE, "image/png")), ("files", ("b.png", WHITE, "image/png"))]
        assert (await served.client.post("/predict-many", files=files)).status_code == 200
        assert await decisions_total(served) == {
            ("accept", "none"): 3.0,
            ("refer", "low_confidence"): 0.0,
            ("refer", "out_of_distribution"): 2.0,
        }
    async with serving(model_dir, refer_below=0.9) as served:
        await predict(served, TILE)
        assert (await decisions_total(served))[("refer", "low_confidence")] == 1.0
