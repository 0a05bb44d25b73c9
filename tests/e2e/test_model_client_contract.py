"""One contract, two `ModelClient`s: `ModelRuntime` (in this process) and `RemoteModelClient`
(a real model process over the real transport). Same model, same images, same answers.

`ModelRuntime` runs twice: alone (`in-process`, one process serving) and bounded by a shared
`QueueBound` (`in-front`, a front of several with the model in each): the queue bound is the
same whatever the placement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from service.core.model_client import ModelClient
from service.core.queue_bound import QueueBound
from service.core.runtime import ModelRuntime, open_runtime
from service.errors import Overloaded, ShuttingDown
from service.model.source import fetch_configured_model
from service.settings import Settings
from tests.model_process import ModelProcess, model_process
from tests.onnx_models import write_model_v2_dir

pytestmark = pytest.mark.anyio

QUEUE_LIMIT = 8
ENV = {"LUNGSERVE_MAX_BATCH_SIZE": "4", "LUNGSERVE_MAX_FILES_PER_REQUEST": "8", "LUNGSERVE_REFER_BELOW": "0.5"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("contract")
    write_model_v2_dir(folder / "model", decision={"refer_below": 0.5, "ood_above": 60.0})
    return folder


@pytest.fixture(scope="module")
def remote(folder: Path) -> Iterator[ModelProcess]:
    with model_process(folder, queue_limit=QUEUE_LIMIT, **ENV) as mp:
        yield mp


def _settings(folder: Path) -> Settings:
    return Settings(
        model_uri=str(folder / "model"),
        queue_limit=QUEUE_LIMIT,
        max_batch_size=4,
        max_files_per_request=8,
        refer_below=0.5,
    )


async def _runtime(folder: Path, bound: QueueBound | None = None) -> ModelRuntime:
    settings = _settings(folder)
    return await open_runtime(await fetch_configured_model(settings), settings, shared_bound=bound)


@asynccontextmanager
async def opened(kind: str, folder: Path, remote: ModelProcess) -> AsyncIterator[ModelClient]:
    client: ModelClient
    bound = None
    if kind == "in-process":
        client = await _runtime(folder)
    elif kind == "in-front":
        QueueBound.create(folder / "fronts-queue")  # zeroed: what the supervisor does at start
        bound = QueueBound(folder / "fronts-queue", 1, QUEUE_LIMIT)
        client = await _runtime(folder, bound)
    else:
        client = remote.client()
        await client.start()
    try:
        yield client
    finally:
        await client.stop(5.0)
        if bound is not None:
            assert bound.used == 0  # every slot of the shared count came back
            bound.close()


@pytest.fixture(params=["in-process", "in-front", "remote"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(n)]


async def test_it_describes_the_model(kind: str, folder: Path, remote: ModelProcess) -> None:
    async with opened(kind, folder, remote) as client:
        assert client.identity.version == "2"
        assert client.manifest.classes == ["lung_aca", "lung_n", "lung_scc"]
        assert client.provider == "CPUExecutionProvider"
        assert client.input_size == 128
        assert "ood_score" in client.output_names
        assert client.queue_limit == QUEUE_LIMIT
        assert client.thresholds.refer_below == 0.5
        assert client.free_slots == QUEUE_LIMIT


async def test_answers_are_the_same_wherever_the_model_runs(folder: Path, remote: ModelProcess) -> None:
    images = _images(6)
    answers = {}
    for kind in ("in-process", "remote"):
        async with opened(kind, folder, remote) as client:
            with client.reserve(len(images)) as slots:
                answers[kind] = await asyncio.gather(*(client.infer(slots, image) for image in images))
    for (a, info_a), (b, info_b) in zip(answers["in-process"], answers["remote"], strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6)
        assert a.decision == b.decision
        assert a.ood_score == pytest.approx(b.ood_score)
        assert a.manifest == b.manifest
        assert 1 <= info_a.size <= 4
        assert 1 <= info_b.size <= 4


async def test_the_queue_limit_is_all_or_nothing(kind: str, folder: Path, remote: ModelProcess) -> None:
    async with opened(kind, folder, remote) as client:
        held = client.reserve(QUEUE_LIMIT - 1)
        with pytest.raises(Overloaded) as refused:
            client.reserve(2)
        assert refused.value.status == 503
        assert client.has_room()
        last = client.reserve(1)
        assert not client.has_room()
        assert client.free_slots == 0
        held.release()
        held.release()  # idempotent
        last.release()
        assert client.free_slots == QUEUE_LIMIT


@pytest.mark.parametrize("placement", ["in-front", "remote"])
async def test_the_queue_limit_holds_across_fronts(placement: str, folder: Path, remote: ModelProcess) -> None:
    """Two fronts, one bound: a front that holds nothing is refused when the other holds the
    slots, with the same 503 + Retry-After, wherever the model runs."""
    a: ModelClient
    b: ModelClient
    if placement == "in-front":
        path = folder / "two-fronts-queue"
        QueueBound.create(path)
        a = await _runtime(folder, QueueBound(path, 0, QUEUE_LIMIT))
        b = await _runtime(folder, QueueBound(path, 1, QUEUE_LIMIT))
    else:
        a, b = remote.client(0), remote.client(1)
        await a.start()
        await b.start()
    try:
        held = a.reserve(QUEUE_LIMIT - 1)
        assert b.has_room()
        assert b.free_slots == 1
        with pytest.raises(Overloaded) as refused:
            b.reserve(2)  # 7 + 2 > 8, though b itself holds nothing
        assert (refused.value.status, refused.value.retry_after_s) == (503, 1)
        one = b.reserve(1)
        assert not a.has_room()
        assert not b.has_room()
        with pytest.raises(Overloaded):
            a.reserve(1)
        await b.infer(one, _images(1)[0])  # answered: its slot is free again, for either front
        assert a.has_room()
        assert a.free_slots == b.free_slots == 1
        held.release()
        assert a.free_slots == b.free_slots == QUEUE_LIMIT
        a.reserve(QUEUE_LIMIT).release()  # the whole bound, for one front
    finally:
        await a.stop(5.0)
        await b.stop(5.0)


async def test_grad_cam_outputs_match(folder: Path, remote: ModelProcess) -> None:
    batch = np.stack(_images(2))
    outputs = {}
    for kind in ("in-process", "remote"):
        async with opened(kind, folder, remote) as client:
            outputs[kind] = await client.run_outputs(batch, ["feature_maps", "cam_weights"])
    for a, b in zip(outputs["in-process"], outputs["remote"], strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


async def test_stop_finishes_what_was_admitted_and_refuses_the_rest(
    kind: str, folder: Path, remote: ModelProcess
) -> None:
    async with opened(kind, folder, remote) as client:
        slots = client.reserve(3)
        work = [asyncio.ensure_future(client.infer(slots, image)) for image in _images(3)]
        await client.stop(5.0)
        answers = await asyncio.gather(*work)
        assert all(result.manifest.version == "2" for result, _ in answers)
        with pytest.raises(ShuttingDown):
            client.reserve(1)


@pytest.fixture
def tiles(lc25000: Path) -> list[np.ndarray]:
    from service.model.preprocess import load_image

    return [load_image(p.read_bytes(), 128) for p in sorted(lc25000.rglob("*.jpeg"))[::997][:6]]


async def test_decisions_match_on_real_tiles_with_the_tissue_check(
    tiles: list[np.ndarray], folder: Path, remote: ModelProcess
) -> None:
    """The model process leaves the tissue check to the front: on real H&E tiles (plausible) and
    on noise (not), the decisions are those of one process."""
    images = tiles + _images(2)
    decided = {}
    for kind in ("in-process", "remote"):
        async with opened(kind, folder, remote) as client:
            assert client.thresholds.tissue_check
            with client.reserve(len(images)) as slots:
                answers = await asyncio.gather(*(client.infer(slots, image) for image in images))
            decided[kind] = [result.decision for result, _ in answers]
    assert decided["remote"] == decided["in-process"]
    assert len(set(decided["remote"])) >= 2  # both sides of the tissue check were exercised


async def test_low_priority_images_are_answered_too(kind: str, folder: Path, remote: ModelProcess) -> None:
    """Slide jobs' images (low priority) go through the same queue and come back the same."""
    images = _images(3)
    async with opened(kind, folder, remote) as client:
        with client.reserve(2) as urgent, client.reserve(len(images), low_priority=True) as slides:
            answers = await asyncio.gather(
                *(client.infer(slides, image) for image in images), *(client.infer(urgent, i) for i in images[:2])
            )
        low, high = answers[: len(images)], answers[len(images) :]
        for (a, _), (b, _) in zip(low[:2], high, strict=True):
            np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6)
        assert client.free_slots == QUEUE_LIMIT
