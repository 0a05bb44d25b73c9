"""The serving pipeline behind the routes: model runtime (engine + batcher), decode, state.

* `ModelRuntime`: one model version being served -- its `Engine` and the `Batcher` that
  feeds it. The batcher's handler closes over *this* engine, so a result always carries the
  manifest of the model that computed it.
* `ServiceState`: what an app instance holds on `app.state.service`: settings, the decode
  pool, the current `ModelRuntime` and the lifecycle phase. A hot reload (`service.reload`)
  builds and warms a new `ModelRuntime`, swaps it in with `replace_runtime`, then stops
  (drains) the old one; requests already holding the old runtime finish on it.
* `PredictionObserver`: where per-image statistics leave the request path (metrics and
  request logs plug in here; the default does nothing).

Framework-free: the HTTP side (deadline, client disconnects) is in `service.http_guards`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray

from service.batcher import Batcher, BatcherStopped, BatchInfo, BatchObserver, QueueFull, Reservation
from service.engine import Engine
from service.errors import (
    InferenceFailed,
    InvalidImage,
    LungserveError,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
)
from service.manifest import Manifest
from service.model_source import ModelIdentity
from service.preprocess import load_image
from service.settings import Settings

log = logging.getLogger(__name__)

Image = NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class Classified:
    """One image's model output, with the manifest of the model that produced it."""

    probabilities: NDArray[np.float32]  # (C,), manifest class order
    manifest: Manifest
    decode_s: float | None = None  # when the batch's worker decoded it (an `Encoded` item)
    infer_s: float | None = None  # the model run of its batch, without decoding

    @property
    def label(self) -> str:
        return self.manifest.classes[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))

    def by_class(self) -> dict[str, float]:
        return dict(zip(self.manifest.classes, self.probabilities.tolist(), strict=True))


@dataclass(frozen=True, slots=True)
class Encoded:
    """An upload's bytes, decoded by the batch's own worker thread: no thread hop per image."""

    data: bytes
    max_pixels: int


@dataclass(frozen=True, slots=True)
class Undecodable:
    """An `Encoded` item that is not an image: its own error, never its batch's."""

    error: LungserveError
    decode_s: float


BatchItem = Image | Encoded

# The first bytes of the formats `load_image` accepts (JPEG, PNG, TIFF little/big-endian and
# BigTIFF, BMP): anything else is refused on the event loop, before it is queued.
_SIGNATURES: Final = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"BM",
)
BatchResult = Classified | Undecodable

ImageBatcher = Batcher[BatchItem, BatchResult]
ImageReservation = Reservation[BatchItem, BatchResult]


class PredictionObserver(Protocol):
    """Per-request statistics hook (metrics, access-log fields). Called on the event loop."""

    def on_decoded(self, seconds: float) -> None:
        """One image decoded and resized, taking `seconds` of a pool thread."""

    def on_classified(self, result: Classified, info: BatchInfo) -> None:
        """One image answered; `info` says which batch carried it and how long it waited."""

    def on_image_failed(self, error: LungserveError) -> None:
        """One image got its own error (invalid, too large, its batch failed, ...)."""

    def on_rejected(self, error: LungserveError) -> None:
        """A whole request refused before compute (overload, deadline, not ready, shutting down)."""


class NullPredictionObserver:
    def on_decoded(self, seconds: float) -> None:
        pass

    def on_classified(self, result: Classified, info: BatchInfo) -> None:
        pass

    def on_image_failed(self, error: LungserveError) -> None:
        pass

    def on_rejected(self, error: LungserveError) -> None:
        pass


class ModelRuntime:
    """An engine and the batcher feeding it: everything that changes with the model version."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        identity: ModelIdentity | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.engine = engine
        # Which model and where it came from (source, etag): /model, reload, logs, metrics.
        self.identity = identity if identity is not None else ModelIdentity.of(engine.manifest)
        self.retry_after_s = settings.retry_after_s
        self.batcher: ImageBatcher = Batcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_s,
            queue_limit=settings.queue_limit,
            max_in_flight_batches=settings.max_in_flight_batches,
            observer=observer,  # HOOK(metrics): `Metrics` implements BatchObserver
        )

    def _infer(self, items: Sequence[BatchItem]) -> list[BatchResult]:
        """The batch handler: runs in the batcher's worker thread, decodes `Encoded` items first.

        Decoding here rather than in a pool of its own saves two thread hops per image; a file
        that is not an image becomes its own `Undecodable`, and the rest of the batch runs.
        """
        size = self.engine.input_size
        manifest = self.engine.manifest
        arrays: list[Image] = []
        rows: list[int] = []
        decoded_in: list[float | None] = [None] * len(items)
        results: list[BatchResult | None] = [None] * len(items)
        for i, item in enumerate(items):
            if isinstance(item, Encoded):
                started = time.perf_counter()
                try:
                    array = load_image(item.data, size, max_pixels=item.max_pixels)
                except LungserveError as exc:
                    results[i] = Undecodable(exc, time.perf_counter() - started)
                    continue
                except Exception:  # a decoder bug must cost this image only, and be seen
                    log.exception("decoding an upload failed unexpectedly")
                    error = InvalidImage("not a decodable image (expected JPEG, PNG, TIFF or BMP)")
                    results[i] = Undecodable(error, time.perf_counter() - started)
                    continue
                decoded_in[i] = time.perf_counter() - started
                arrays.append(array)
            else:
                arrays.append(item)
            rows.append(i)
        if arrays:
            started = time.perf_counter()
            probs = self.engine.run(np.stack(arrays))
            infer_s = time.perf_counter() - started
            for i, row in zip(rows, probs, strict=True):
                results[i] = Classified(row, manifest, decoded_in[i], infer_s)
        return [r for r in results if r is not None]

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, drain_timeout_s: float) -> None:
        await self.batcher.stop(drain_timeout_s=drain_timeout_s)

    def reserve(self, n: int) -> ImageReservation:
        """Admission control: `n` queue slots now, or 503 -- before any body is read or decoded."""
        try:
            return self.batcher.reserve(n)
        except QueueFull as exc:
            raise Overloaded(
                f"the server is at capacity ({exc.queue_limit} images admitted); retry shortly",
                retry_after_s=self.retry_after_s,
            ) from exc
        except BatcherStopped as exc:
            raise ShuttingDown("the server is shutting down") from exc

    async def classify(self, reservation: ImageReservation, image: Image) -> tuple[Classified, BatchInfo]:
        """One decoded image -> its result and the batch that carried it."""
        result, info = await self._submit(reservation, image)
        assert isinstance(result, Classified)  # only `Encoded` items can be undecodable
        return result, info

    async def classify_encoded(self, reservation: ImageReservation, upload: Encoded) -> tuple[BatchResult, BatchInfo]:
        """One upload's bytes, decoded by its batch's worker -> its result or `Undecodable`."""
        return await self._submit(reservation, upload)

    async def _submit(self, reservation: ImageReservation, item: BatchItem) -> tuple[BatchResult, BatchInfo]:
        try:
            future = reservation.submit(item)
        except BatcherStopped as exc:
            raise ShuttingDown("the server is shutting down") from exc
        try:
            return await future
        except BatcherStopped as exc:
            raise ShuttingDown("the server shut down before this image was classified") from exc
        except LungserveError:
            raise
        except Exception as exc:
            # The whole batch failed; only its own requests see this error.
            log.error("model run failed for a batch: %s", exc, exc_info=exc)
            raise InferenceFailed("the model run for this image's batch failed") from exc


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass
class ServiceState:
    """Everything one app instance holds (on `app.state.service`); no module globals."""

    settings: Settings
    observer: PredictionObserver = field(default_factory=NullPredictionObserver)
    decode_pool: ThreadPoolExecutor | None = None
    runtime: ModelRuntime | None = None
    phase: Phase = Phase.STARTING

    def current(self) -> ModelRuntime:
        """The runtime to serve this request with, or the 503 that explains why there is none."""
        if self.phase is Phase.STOPPING:
            raise ShuttingDown("the server is shutting down")
        if self.phase is not Phase.READY or self.runtime is None:
            raise ModelNotReady("the model is still loading or warming up")
        return self.runtime

    def replace_runtime(self, new: ModelRuntime) -> ModelRuntime | None:
        """Swap in a started, warmed runtime; the caller stops (drains) the returned old one."""
        old, self.runtime = self.runtime, new
        return old

    async def classify_upload(
        self, runtime: ModelRuntime, reservation: ImageReservation, data: bytes
    ) -> tuple[Classified, BatchInfo]:
        """An upload's bytes -> its result; decoded in its batch's worker thread (the hot path).

        Raises the file's own error (InvalidImage, ImageTooLarge) when it does not decode.
        """
        if not data:
            raise InvalidImage("the file is empty")
        if not data.startswith(_SIGNATURES):
            # Refused before it takes a place in a batch (and in its size and queue figures).
            raise InvalidImage("not a decodable image (expected JPEG, PNG, TIFF or BMP)")
        result, info = await runtime.classify_encoded(reservation, Encoded(data, self.settings.max_image_pixels))
        if isinstance(result, Undecodable):
            raise result.error
        if result.decode_s is not None:
            self.observer.on_decoded(result.decode_s)
        return result, info

    async def decode(self, data: bytes, size: int) -> Image:
        """`load_image` in the decode pool, for doors that need the pixels themselves."""
        if self.decode_pool is None:
            raise ModelNotReady("the server is not started")
        loop = asyncio.get_running_loop()
        image, seconds = await loop.run_in_executor(
            self.decode_pool, _timed_load, data, size, self.settings.max_image_pixels
        )
        self.observer.on_decoded(seconds)
        return image


def _timed_load(data: bytes, size: int, max_pixels: int) -> tuple[Image, float]:
    started = time.perf_counter()
    image = load_image(data, size, max_pixels=max_pixels)
    return image, time.perf_counter() - started
