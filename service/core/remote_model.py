"""The pieces of the fronts' side of the model process that are not the connection itself:
what a MODEL frame says (`ModelInfo`), a request's queue slots (`RemoteReservation`), the
mapping of answers to domain errors, and the reloader a front uses (`RemoteReloader`: the
reload happens in the model process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from service import errors
from service.core import transport as wire
from service.core.reload import ReloadResult
from service.errors import LungserveError, ModelNotReady, Overloaded, ShuttingDown
from service.model.decision import Thresholds
from service.model.manifest import Manifest
from service.model.source import ModelIdentity


class _Reloads(Protocol):
    """The part of `RemoteModelClient` a reload needs (a protocol: no import back up to it)."""

    async def reload(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RemoteModel:
    """Where a front finds the model process (given by the supervisor)."""

    socket_path: Path
    queue_bound: Path
    front: int


class RemoteReservation:
    """`n` admitted images of one request: slots of the shared bound until each is answered."""

    def __init__(self, give: Callable[[int], None], n: int, *, low_priority: bool = False) -> None:
        self._give = give
        self.remaining = n
        self.low_priority = low_priority

    def take_one(self) -> None:
        if self.remaining <= 0:
            raise RuntimeError("reservation has no slot left: reserve one slot per item")
        self.remaining -= 1  # the slot now travels with the image; its answer gives it back

    def release(self) -> None:
        if self.remaining:
            n, self.remaining = self.remaining, 0
            self._give(n)

    def __enter__(self) -> RemoteReservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ModelInfo:
    """What the model process said it serves (one MODEL frame)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.generation = int(doc["generation"])
        self.manifest = Manifest.model_validate(doc["manifest"])
        self.identity = ModelIdentity(**doc["identity"])
        self.provider = str(doc["provider"])
        self.input_size = int(doc["input_size"])
        self.output_names = [str(n) for n in doc["output_names"]]
        self.max_batch_size = int(doc["max_batch_size"])
        self.thresholds = Thresholds(**doc["thresholds"])


def status_error(status: wire.Status, retry_after_s: int) -> LungserveError:
    if status is wire.Status.OVERLOADED:
        return Overloaded("the server is at capacity; retry shortly", retry_after_s=retry_after_s)
    if status is wire.Status.SHUTTING_DOWN or status is wire.Status.CANCELLED:
        return ShuttingDown("the server shut down before this image was classified")
    if status is wire.Status.NOT_READY:
        return ModelNotReady("the model is not ready; retry shortly")
    return errors.InferenceFailed("the model run for this image's batch failed")


def call_error(reply: dict[str, Any]) -> LungserveError:
    cls = getattr(errors, str(reply["error"]), None)
    message = str(reply.get("message", "the model process refused the call"))
    if cls is Overloaded:
        return Overloaded(message, retry_after_s=int(reply.get("retry_after_s", 1)))
    if isinstance(cls, type) and issubclass(cls, LungserveError):
        try:
            return cls(message)
        except TypeError:
            pass
    return errors.InferenceFailed(message)


class RemoteReloader:
    """`ModelReloader`'s surface for a front: the model process fetches, warms and swaps (and
    polls the ETag); every front learns the new model from its MODEL frame."""

    def __init__(self, client: _Reloads) -> None:
        self._client = client

    async def reload(self) -> ReloadResult:
        answer = await self._client.reload()
        return ReloadResult(
            changed=bool(answer["changed"]),
            previous=ModelIdentity(**answer["previous"]),
            current=ModelIdentity(**answer["current"]),
        )

    def start_polling(self) -> None:
        """The model process polls (LUNGSERVE_MODEL_POLL_INTERVAL_S): once, not once per front."""

    async def stop(self) -> None:
        """Nothing runs here."""
