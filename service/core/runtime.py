"""`ModelRuntime`: the in-process `ModelClient` -- one model version's engine and its batcher.

The batcher's handler closes over *this* engine, so a result always carries the manifest of
the model that computed it. A hot reload (`service.core.reload`) opens a new runtime beside
the serving one, swaps it in and drains the old one.

In a front of `lungserve serve` with several fronts and the model in each (docs/topology.md),
the batcher is also bounded by the server's shared count (`shared_bound`, a `QueueBound`), so
`queue_limit` holds for the whole server, as it does with a model process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from service.core.batcher import (
    Batcher,
    BatcherStopped,
    BatchInfo,
    BatchObserver,
    QueueFull,
    Reservation,
    SharedBound,
)
from service.core.engine import CUDA, Engine
from service.core.model_client import Classified, Pixels, Slots
from service.errors import InferenceFailed, LungserveError, Overloaded, ShuttingDown
from service.model.decision import Thresholds, decide_batch
from service.model.manifest import Manifest
from service.model.source import ModelArtifact, ModelIdentity
from service.settings import Settings

log = logging.getLogger(__name__)

ImageReservation = Reservation[Pixels, Classified]


class ModelRuntime:
    """An engine and the batcher feeding it: everything that changes with the model version."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        identity: ModelIdentity | None = None,
        observer: BatchObserver | None = None,
        shared_bound: SharedBound | None = None,
    ) -> None:
        self._engine = engine
        # Which model and where it came from (source, etag): /model, reload, logs, metrics.
        self.identity = identity if identity is not None else ModelIdentity.of(engine.manifest)
        self._retry_after_s = settings.retry_after_s
        self._batch_sizes = range(1, settings.max_batch_size + 1)
        self._max_batch_size = settings.max_batch_size
        self._buffers = threading.local()  # each batcher worker thread's batch buffer (`_stack`)
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
        self._batcher: Batcher[Pixels, Classified] = Batcher(
            self._infer_batch,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_s,
            queue_limit=settings.queue_limit,
            max_in_flight_batches=settings.max_in_flight_batches,
            observer=observer,  # `Metrics` implements BatchObserver
            shared_bound=shared_bound,  # queue_limit across every front of the server
        )

    # --- what the model is -------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self._engine.manifest

    @property
    def provider(self) -> str:
        return self._engine.provider

    @property
    def input_size(self) -> int:
        return self._engine.input_size

    @property
    def output_names(self) -> list[str]:
        return self._engine.output_names

    @property
    def queue_limit(self) -> int:
        return self._batcher.queue_limit

    # --- serving -----------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self._batcher.available

    def has_room(self) -> bool:
        return self._batcher.available > 0

    def reserve(self, n: int, *, low_priority: bool = False) -> ImageReservation:
        try:
            return self._batcher.reserve(n, low_priority=low_priority)
        except QueueFull as exc:
            raise Overloaded(
                f"the server is at capacity ({exc.queue_limit} images admitted); retry shortly",
                retry_after_s=self._retry_after_s,
            ) from exc
        except BatcherStopped as exc:
            raise ShuttingDown("the server is shutting down") from exc

    async def infer(self, slots: Slots, image: Pixels) -> tuple[Classified, BatchInfo]:
        if not isinstance(slots, Reservation):
            raise TypeError("slots must come from this runtime's reserve()")
        try:
            future = slots.submit(image)
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

    async def run_outputs(self, batch: Pixels, names: Sequence[str]) -> list[NDArray[np.float32]]:
        return await asyncio.to_thread(self._engine.run_outputs, batch, list(names))

    def _infer_batch(self, images: Sequence[Pixels]) -> list[Classified]:
        """The batch handler, in the batcher's worker thread: the refer decision is made here,
        once, beside the model's output (service.model.decision)."""
        batch = self._stack(images)
        out = self._engine.infer(batch)
        decisions = decide_batch(batch, out.probabilities, out.ood_score, self.thresholds)
        manifest = self._engine.manifest
        scores: list[float | None] = [None] * len(decisions) if out.ood_score is None else out.ood_score.tolist()
        return [
            Classified(row, manifest, decision, score)
            for row, decision, score in zip(out.probabilities, decisions, scores, strict=True)
        ]

    def _stack(self, images: Sequence[Pixels]) -> Pixels:
        """The images as one (N, S, S, 3) batch, copied into this worker thread's own buffer.

        A fresh array per batch (np.stack) costs new pages and per-image Python work on every
        batch; the buffer is reused (nothing keeps the batch once the handler returns). Images
        that do not fit it (another shape or dtype) go through np.stack, which says why.
        """
        shape = images[0].shape
        if len(shape) != 3 or any(image.shape != shape for image in images):
            return np.stack(images)
        buffer: Pixels | None = getattr(self._buffers, "batch", None)
        if buffer is None or len(buffer) < len(images) or buffer.shape[1:] != shape:
            buffer = np.empty((max(len(images), self._max_batch_size), *shape), dtype=np.uint8)
            self._buffers.batch = buffer
        batch = buffer[: len(images)]
        try:
            # Into the (N*S, S, 3) view of the same memory: one copy per image, no stacking.
            np.concatenate(images, out=batch.reshape(-1, *shape[1:]), casting="no")
        except TypeError:  # not uint8
            return np.stack(images)
        return batch

    # --- lifecycle ---------------------------------------------------------------------------

    async def warm_up(self) -> None:
        # Seconds of CPU/GPU work: off the loop, so /health/live stays responsive meanwhile.
        await asyncio.to_thread(self._engine.warm_up, self._batch_sizes)

    async def start(self) -> None:
        await self._batcher.start()

    async def stop(self, drain_timeout_s: float) -> None:
        await self._batcher.stop(drain_timeout_s=drain_timeout_s)


def max_batch_size_for(provider: str, settings: Settings) -> int:
    """Images per model run for the provider the session really got: a GPU wants large batches
    (LUNGSERVE_MAX_BATCH_SIZE_CUDA), a CPU small ones (LUNGSERVE_MAX_BATCH_SIZE)."""
    if provider == CUDA and settings.max_batch_size_cuda is not None:
        return settings.max_batch_size_cuda
    return settings.max_batch_size


async def open_runtime(
    artifact: ModelArtifact,
    settings: Settings,
    observer: BatchObserver | None = None,
    *,
    shared_bound: SharedBound | None = None,
) -> ModelRuntime:
    """Engine -> warm-up of every batch size the batcher can form -> started batcher.

    Start-up and hot reload both open their runtime with this; `shared_bound`: the server's
    queue_limit count, shared with the other fronts (each runtime of a front uses the same one).
    """
    engine = await asyncio.to_thread(
        Engine,
        artifact.onnx_path,
        artifact.manifest,
        provider=settings.provider,
        intra_op_threads=settings.ort_intra_op_threads,
        inter_op_threads=settings.ort_inter_op_threads,
    )
    batch = max_batch_size_for(engine.provider, settings)
    if batch != settings.max_batch_size:
        log.info("batches of up to %d on %s (LUNGSERVE_MAX_BATCH_SIZE_CUDA)", batch, engine.provider)
        settings = settings.model_copy(update={"max_batch_size": batch})
    runtime = ModelRuntime(engine, settings, identity=artifact.identity, observer=observer, shared_bound=shared_bound)
    await runtime.warm_up()
    await runtime.start()
    return runtime
