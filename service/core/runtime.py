"""The serving pipeline behind the routes: decode pool, model runtime (engine + batcher), state.

* `ModelRuntime`: one model version being served -- its `Engine` and the `Batcher` that
  feeds it. The batcher's handler closes over *this* engine, so a result always carries the
  manifest of the model that computed it.
* `ServiceState`: what an app instance holds on `app.state.service`: settings, the decode
  pool, the current `ModelRuntime` and the lifecycle phase. A hot reload (`service.core.reload`)
  builds and warms a new `ModelRuntime`, swaps it in with `replace_runtime`, then stops
  (drains) the old one; requests already holding the old runtime finish on it.
* `PredictionObserver`: where per-image statistics leave the request path (metrics and
  request logs plug in here; the default does nothing).

Framework-free: the HTTP side (deadline, client disconnects) is in `service.http.guards`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from service.core.admission import UploadGate
from service.core.batcher import Batcher, BatcherStopped, BatchInfo, BatchObserver, QueueFull, Reservation
from service.core.decode_pool import Decoder, PixelAllowance
from service.core.engine import Engine
from service.errors import (
    InferenceFailed,
    LungserveError,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
)
from service.model.decision import Decision, Thresholds, decide_batch
from service.model.manifest import Manifest
from service.model.source import ModelIdentity
from service.settings import Settings

log = logging.getLogger(__name__)

Image = NDArray[np.uint8]


@dataclass(frozen=True)
class Classified:
    """One image's answer: the model's output, the refer decision made beside it, and the
    manifest of the model that produced it. Every door reports `decision` from here."""

    probabilities: NDArray[np.float32]  # (C,), manifest class order
    manifest: Manifest
    decision: Decision
    ood_score: float | None = None  # the model's out-of-distribution score, when it has one

    @property
    def label(self) -> str:
        return self.manifest.classes[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))

    def by_class(self) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.manifest.classes, self.probabilities, strict=True)}


ImageBatcher = Batcher[Image, Classified]
ImageReservation = Reservation[Image, Classified]


class PredictionObserver(Protocol):
    """Per-request statistics hook (metrics, access-log fields). Called on the event loop."""

    def on_decoded(self, seconds: float) -> None:
        """One image decoded and resized, taking `seconds` of a pool thread."""

    def on_classified(self, result: Classified, info: BatchInfo) -> None:
        """One image answered; `info` says which batch carried it and how long it waited."""

    def on_image_failed(self, error: LungserveError) -> None:
        """One image got its own error (invalid, too large, its batch failed, ...)."""

    def on_image_abandoned(self) -> None:
        """One admitted image's work was cancelled (client gone, deadline) before its answer."""

    def on_rejected(self, error: LungserveError) -> None:
        """A whole request refused before compute (overload, deadline, not ready, shutting down)."""


class NullPredictionObserver:
    def on_decoded(self, seconds: float) -> None:
        pass

    def on_classified(self, result: Classified, info: BatchInfo) -> None:
        pass

    def on_image_failed(self, error: LungserveError) -> None:
        pass

    def on_image_abandoned(self) -> None:
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
        # This model's thresholds (its manifest), with LUNGSERVE_REFER_BELOW / _OOD_ABOVE on top.
        self.thresholds = Thresholds.resolve(
            engine.manifest,
            refer_below=settings.refer_below,
            ood_above=settings.ood_above,
            tissue_check=settings.tissue_check,
        )
        log.info(
            "refer decision for %s %s: refer_below=%s ood_above=%s tissue_check=%s",
            engine.manifest.name,
            engine.manifest.version,
            self.thresholds.refer_below,
            self.thresholds.ood_above,
            self.thresholds.tissue_check,
        )
        self.batcher: ImageBatcher = Batcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_s,
            queue_limit=settings.queue_limit,
            max_in_flight_batches=settings.max_in_flight_batches,
            observer=observer,  # HOOK(metrics): `Metrics` implements BatchObserver
        )

    def _infer(self, images: Sequence[Image]) -> list[Classified]:
        """The batch handler: runs in the batcher's worker thread. The refer decision is made
        here, once, beside the model's output (service.model.decision)."""
        batch = np.stack(images)
        out = self.engine.infer(batch)
        decisions = decide_batch(batch, out.probabilities, out.ood_score, self.thresholds)
        manifest = self.engine.manifest
        scores: list[float | None] = [None] * len(decisions) if out.ood_score is None else out.ood_score.tolist()
        return [
            Classified(row, manifest, decision, score)
            for row, decision, score in zip(out.probabilities, decisions, scores, strict=True)
        ]

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, drain_timeout_s: float) -> None:
        await self.batcher.stop(drain_timeout_s=drain_timeout_s)

    def reserve(self, n: int, *, low_priority: bool = False) -> ImageReservation:
        """Admission control: `n` queue slots now, or 503 -- before any body is read or decoded.

        `low_priority`: background work (slide jobs) that interactive requests overtake."""
        try:
            return self.batcher.reserve(n, low_priority=low_priority)
        except QueueFull as exc:
            raise Overloaded(
                f"the server is at capacity ({exc.queue_limit} images admitted); retry shortly",
                retry_after_s=self.retry_after_s,
            ) from exc
        except BatcherStopped as exc:
            raise ShuttingDown("the server is shutting down") from exc

    async def classify(self, reservation: ImageReservation, image: Image) -> tuple[Classified, BatchInfo]:
        try:
            future = reservation.submit(image)
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
    DRAINING = "draining"  # shutdown begun: /health/ready says 503, requests are still served
    STOPPING = "stopping"


@dataclass
class ServiceState:
    """Everything one app instance holds (on `app.state.service`); no module globals."""

    settings: Settings
    observer: PredictionObserver = field(default_factory=NullPredictionObserver)
    decoder: Decoder | None = None
    upload_gate: UploadGate | None = None
    runtime: ModelRuntime | None = None
    phase: Phase = Phase.STARTING

    def current(self) -> ModelRuntime:
        """The runtime to serve this request with, or the 503 that explains why there is none."""
        if self.phase is Phase.STOPPING:
            raise ShuttingDown("the server is shutting down")
        if self.phase not in (Phase.READY, Phase.DRAINING) or self.runtime is None:
            raise ModelNotReady("the model is still loading or warming up")
        return self.runtime

    def ready(self) -> ModelRuntime:
        """`current()` for readiness probes: 503 as soon as shutdown has begun (load balancers
        stop sending while the listener still accepts)."""
        if self.phase is Phase.DRAINING:
            raise ShuttingDown("the server is shutting down")
        return self.current()

    def replace_runtime(self, new: ModelRuntime) -> ModelRuntime | None:
        """Swap in a started, warmed runtime; the caller stops (drains) the returned old one."""
        old, self.runtime = self.runtime, new
        return old

    async def classify_image(
        self,
        runtime: ModelRuntime,
        reservation: ImageReservation,
        image: bytes | Image | LungserveError,
        allowance: PixelAllowance | None = None,
    ) -> Classified | LungserveError:
        """One admitted image -> its result, or its own error *returned* (so one bad image never
        fails the others). Every door (/predict, /predict-many, OIP) goes through here, so every
        admitted image is counted in exactly one outcome: classified, its own error, or abandoned
        (its request was cancelled: client gone, deadline)."""
        try:
            if isinstance(image, LungserveError):
                raise image  # refused while it was read (e.g. over the byte limit)
            if isinstance(image, bytes):
                pixels = await self.decode(image, runtime.engine.input_size, allowance)
            else:
                pixels = image
            result, info = await runtime.classify(reservation, pixels)
        except LungserveError as exc:
            self.observer.on_image_failed(exc)  # HOOK(metrics/logs): per-image error
            return exc
        except asyncio.CancelledError:
            self.observer.on_image_abandoned()
            raise
        self.observer.on_classified(result, info)  # HOOK(metrics/logs): batch id, queue wait, label
        return result

    async def decode(self, data: bytes, size: int, allowance: PixelAllowance | None = None) -> Image:
        """Decode off the event loop, within the request's pixel allowance (`service.core.decode_pool`)."""
        if self.decoder is None:
            raise ModelNotReady("the server is not started")
        image, seconds = await self.decoder.decode(data, size, allowance)
        self.observer.on_decoded(seconds)
        return image
