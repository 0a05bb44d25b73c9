"""Out-of-distribution inputs get "refer" from the bundled model, and real tiles rarely do.

Through the real app (/predict-many, the real engine on the bundled model), with the thresholds of
the bundled manifest. The per-category figures and their command: docs/model/ood.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from service.model.preprocess import load_image
from tests.app.conftest import Served, make_settings, serve
from tests.ood_images import OodImage, miscoloured, ood_images, restained
from tests.ood_study import read_groups

pytestmark = pytest.mark.anyio

FILES_PER_REQUEST = 64
MAX_REAL_OOD = 0.01  # issue 9: at most 1% of real tiles referred as out of distribution


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    settings = make_settings(
        max_batch_size=16,
        queue_limit=FILES_PER_REQUEST,
        max_files_per_request=FILES_PER_REQUEST,
        max_file_bytes=2_000_000,
        max_request_bytes=64_000_000,
        max_image_pixels=4_000_000,
    )
    async with serve(settings) as s:
        yield s


async def predict_many(served: Served, files: Sequence[tuple[str, bytes]]) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for start in range(0, len(files), FILES_PER_REQUEST):
        chunk = files[start : start + FILES_PER_REQUEST]
        r = await served.client.post(
            "/predict-many", files=[("files", (name, data, "application/octet-stream")) for name, data in chunk]
        )
        assert r.status_code == 200, r.text
        results.extend(r.json()["results"])
    return results


async def assert_all_referred(served: Served, images: Sequence[OodImage]) -> None:
    results = await predict_many(served, [(f"{i}.img", item.data) for i, item in enumerate(images)])
    accepted = [
        f"{item.id} -> {r.get('label')} {r.get('confidence')}"
        for item, r in zip(images, results, strict=True)
        if r.get("decision") != "refer"
    ]
    assert not accepted, "accepted out-of-distribution images:\n" + "\n".join(accepted)
    for r in results:
        assert r["reason"] in ("out_of_distribution", "low_confidence")


async def test_every_generated_ood_image_is_referred(served: Served) -> None:
    await assert_all_referred(served, ood_images())


async def test_real_tiles_restained_as_other_stains_are_referred(served: Served, real_images: list[Path]) -> None:
    tiles = [load_image(p.read_bytes(), 256) for p in real_images]
    await assert_all_referred(served, list(restained(tiles)))


# Known gap (docs/model/ood.md): a channel swap or hue shift of a tile whose red and blue are about
# equal gives colours real LC25000 tiles have, so the colour check cannot refer every one. Strict:
# this test fails as soon as every variant is referred, so the marker cannot outlive the gap.
@pytest.mark.xfail(strict=True, reason="some swapped-channel / hue-shifted tiles pass (docs/model/ood.md)")
async def test_real_tiles_with_wrong_colour_handling_are_referred(served: Served, real_images: list[Path]) -> None:
    tiles = [load_image(p.read_bytes(), 256) for p in real_images]
    await assert_all_referred(served, list(miscoloured(tiles)))


@pytest.mark.slow  # real data, and the same on every Python: not in the other-version matrix
async def test_at_most_one_percent_of_real_tiles_are_referred_as_ood(served: Served, lc25000: Path) -> None:
    """Real tiles through the served graph and thresholds: every 8th tile of every group.

    Out of fold (each tile against the bank of the one fold model that never saw it) the rate is
    the manifest's `decision.ood_rate`, fitted at most 0.5% and recomputed in
    tests/unit/test_shipped_model.py. The served ensemble's members trained on every group, so this
    checks what no out-of-fold figure can: that the shipped graph, its banks and `ood_above` agree.
    """
    tiles = read_groups(lc25000)[::8]
    assert len(tiles) > 1000
    results = await predict_many(served, [(t.path.name, t.path.read_bytes()) for t in tiles])
    reasons = Counter(str(r.get("reason")) for r in results)
    assert sum(reasons.values()) == len(tiles)
    assert reasons["out_of_distribution"] <= MAX_REAL_OOD * len(tiles), reasons
