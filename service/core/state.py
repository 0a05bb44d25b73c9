"""`ServiceState`: what one app instance holds -- settings, decode pool, upload gate, the model
being served and the lifecycle phase. No module globals: every app has its own."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from service.core.admission import BodyReader, UploadGate, admit
from service.core.batcher import BatchInfo
from service.core.decode_pool import Decoder
from service.core.model_client import Classified, ModelClient
from service.errors import LungserveError, ModelNotReady, ShuttingDown
from service.settings import Settings

T = TypeVar("T")


class PredictionObserver(Protocol):
    """Per-image statistics hook (metrics, access-log fields). Called on the event loop."""

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


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # shutdown begun: /health/ready says 503, requests are still served
    STOPPING = "stopping"


@dataclass
class ServiceState:
    """Everything one app instance holds (on `app.state.service`)."""

    settings: Settings
    observer: PredictionObserver = field(default_factory=NullPredictionObserver)
    decoder: Decoder | None = None
    upload_gate: UploadGate | None = None
    runtime: ModelClient | None = None
    phase: Phase = Phase.STARTING

    def current(self) -> ModelClient:
        """The model to serve this request with, or the 503 that explains why there is none."""
        if self.phase is Phase.STOPPING:
            raise ShuttingDown("the server is shutting down")
        if self.phase not in (Phase.READY, Phase.DRAINING) or self.runtime is None:
            raise ModelNotReady("the model is still loading or warming up")
        return self.runtime

    def ready(self) -> ModelClient:
        """`current()` for readiness probes: 503 as soon as shutdown has begun (load balancers
        stop sending while the listener still accepts)."""
        if self.phase is Phase.DRAINING:
            raise ShuttingDown("the server is shutting down")
        return self.current()

    def replace_runtime(self, new: ModelClient) -> ModelClient | None:
        """Swap in a started, warmed model; the caller stops (drains) the returned old one."""
        old, self.runtime = self.runtime, new
        return old

    @asynccontextmanager
    async def admit(self, body: BodyReader[T], *, needs_queue: bool = True) -> AsyncIterator[T]:
        """Every door's way in (`service.core.admission.admit`), into the model serving now."""
        if self.upload_gate is None:
            raise ModelNotReady("the server is not started")
        async with admit(self.current(), self.upload_gate, body, needs_queue=needs_queue) as content:
            yield content
