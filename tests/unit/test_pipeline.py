"""The one per-image outcome path (`service.core.pipeline.Outcome`), as every door uses it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

import numpy as np
import pytest
from numpy.typing import NDArray

from service.core.batcher import BatchInfo
from service.core.decode_pool import PixelAllowance
from service.core.model_client import Classified, Pixels, Slots
from service.core.pipeline import classify_image
from service.core.state import ServiceState
from service.errors import InvalidImage, LungserveError
from service.http.analyze import classify_tile
from service.settings import Settings

pytestmark = pytest.mark.anyio


class Counting:
    """A PredictionObserver that counts each outcome."""

    def __init__(self) -> None:
        self.classified = self.failed = self.abandoned = 0

    def on_decoded(self, seconds: float) -> None:
        pass

    def on_classified(self, result: Classified, info: BatchInfo) -> None:
        self.classified += 1

    def on_image_failed(self, error: LungserveError) -> None:
        self.failed += 1

    def on_image_abandoned(self) -> None:
        self.abandoned += 1

    def on_rejected(self, error: LungserveError) -> None:
        pass


class _NoSlots:
    def release(self) -> None:
        pass

    def __enter__(self) -> _NoSlots:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


class StuckModel:
    """The part of a ModelClient the pipeline calls: `infer` never answers until cancelled."""

    input_size = 8

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def infer(self, slots: Slots, image: Pixels) -> tuple[Classified, BatchInfo]:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def run_outputs(self, batch: Pixels, names: Sequence[str]) -> list[NDArray[np.float32]]:
        raise AssertionError("not used")


def _state() -> tuple[ServiceState, Counting]:
    observer = Counting()
    return ServiceState(settings=Settings(provider="cpu"), observer=observer), observer


async def test_a_cancelled_analyze_tile_is_counted_as_abandoned() -> None:
    service, observer = _state()
    model = StuckModel()
    tile = np.zeros((8, 8, 3), dtype=np.uint8)
    task = asyncio.ensure_future(classify_tile(service, model, _NoSlots(), tile))  # type: ignore[arg-type]
    await model.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (observer.classified, observer.failed, observer.abandoned) == (0, 0, 1)


async def test_a_cancelled_image_is_counted_once_as_abandoned() -> None:
    service, observer = _state()
    model = StuckModel()
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    task = asyncio.ensure_future(
        classify_image(service, model, _NoSlots(), pixels, PixelAllowance(10**6))  # type: ignore[arg-type]
    )
    await model.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (observer.classified, observer.failed, observer.abandoned) == (0, 0, 1)


async def test_an_image_refused_while_read_is_returned_and_counted_as_failed() -> None:
    service, observer = _state()
    refused = InvalidImage("not an image")
    outcome = await classify_image(service, StuckModel(), _NoSlots(), refused, PixelAllowance(1))  # type: ignore[arg-type]
    assert outcome is refused
    assert (observer.classified, observer.failed, observer.abandoned) == (0, 1, 0)
