"""Where inference runs, behind one protocol: `ModelClient`.

The doors and the pipeline use only this surface. `service.core.runtime.ModelRuntime` runs the
model in this process; a remote client runs it in the model process. Both pass the same
contract tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from service.core.batcher import BatchInfo
from service.model.decision import Decision, Thresholds
from service.model.manifest import Manifest
from service.model.source import ModelIdentity

# Decoded images: uint8 (S, S, 3), or a batch (N, S, S, 3).
Pixels = NDArray[np.uint8]


@dataclass(frozen=True, init=False)
class Classified:
    """One image's answer: the model's output, the refer decision made beside it, and the
    manifest of the model that produced it. Every door reports `decision` from here."""

    probabilities: NDArray[np.float32]  # (C,), manifest class order
    manifest: Manifest
    decision: Decision
    ood_score: float | None = None  # the model's out-of-distribution score, when it has one

    def __init__(
        self, probabilities: NDArray[np.float32], manifest: Manifest, decision: Decision, ood_score: float | None = None
    ) -> None:
        # One per image, on both sides of the model process: written straight into __dict__,
        # half the cost of a frozen dataclass's generated __init__; frozen all the same.
        fields = self.__dict__
        fields["probabilities"] = probabilities
        fields["manifest"] = manifest
        fields["decision"] = decision
        fields["ood_score"] = ood_score

    @property
    def label(self) -> str:
        return self.manifest.classes[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))

    def by_class(self) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.manifest.classes, self.probabilities, strict=True)}


class Slots(Protocol):
    """Queue slots held for one request's images; unused ones return on `release` (idempotent)."""

    def release(self) -> None: ...

    def __enter__(self) -> Slots: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class ModelClient(Protocol):
    """One model version being served, wherever it runs."""

    # Which model and where it came from; a reload of an unchanged model updates its ETag here.
    identity: ModelIdentity

    @property
    def manifest(self) -> Manifest: ...

    @property
    def provider(self) -> str:
        """The execution provider ONNX Runtime really uses (e.g. CPUExecutionProvider)."""
        ...

    @property
    def input_size(self) -> int: ...

    @property
    def output_names(self) -> list[str]:
        """Every output of the graph (the hot path fetches only the probabilities)."""
        ...

    @property
    def queue_limit(self) -> int: ...

    @property
    def thresholds(self) -> Thresholds:
        """The refer thresholds in force: the manifest's, with settings on top."""
        ...

    @property
    def free_slots(self) -> int:
        """Queue slots not reserved by any request."""
        ...

    def has_room(self) -> bool:
        """At least one queue slot is free: the pre-check before a body is read."""
        ...

    def reserve(self, n: int, *, low_priority: bool = False) -> Slots:
        """`n` queue slots now, or Overloaded (503) / ShuttingDown. `low_priority` (slide jobs):
        their images are batched only after every queued interactive one."""
        ...

    async def infer(self, slots: Slots, image: Pixels) -> tuple[Classified, BatchInfo]:
        """One decoded image, batched with others; its answer and the batch that carried it."""
        ...

    async def run_outputs(self, batch: Pixels, names: Sequence[str]) -> list[NDArray[np.float32]]:
        """The named graph outputs for a batch, outside the batcher (Grad-CAM)."""
        ...

    async def warm_up(self) -> None:
        """Run every batch shape once: the model's one verification before it serves."""
        ...

    async def start(self) -> None: ...

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new work, finish what is queued within the timeout."""
        ...
