"""The per-image path every door shares: decode, batch, count.

Every admitted image ends in exactly one outcome -- classified, its own error, or abandoned
(its request was cancelled: client gone, deadline) -- and `Outcome` is the one place that
counts it, for /predict, /predict-many, OIP, /explain and /analyze tiles alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

from service.core.batcher import BatchInfo
from service.core.decode_pool import PixelAllowance
from service.core.model_client import Classified, ModelClient, Pixels, Slots
from service.core.state import PredictionObserver, ServiceState
from service.errors import LungserveError, ModelNotReady

# An image as a door hands it over: encoded bytes, decoded pixels, or the error it got while read.
ImageInput = bytes | Pixels | LungserveError


class Outcome:
    """`with Outcome(observer) as outcome:` around one image's work; `outcome.classified(...)`
    records its answer, an exception leaving the block records its error or its abandonment."""

    def __init__(self, observer: PredictionObserver) -> None:
        self._observer = observer

    def __enter__(self) -> Outcome:
        return self

    def classified(self, result: Classified, info: BatchInfo) -> Classified:
        self._observer.on_classified(result, info)
        return result

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, LungserveError):
            self._observer.on_image_failed(exc)
        elif isinstance(exc, asyncio.CancelledError):
            self._observer.on_image_abandoned()


async def classify_image(
    service: ServiceState, model: ModelClient, slots: Slots, image: ImageInput, allowance: PixelAllowance
) -> Classified | LungserveError:
    """One admitted image -> its result, or its own error *returned*: one bad image never fails
    the others."""
    try:
        with Outcome(service.observer) as outcome:
            if isinstance(image, LungserveError):
                raise image  # refused while it was read (e.g. over the byte limit)
            pixels = await decode(service, image, model.input_size, allowance) if isinstance(image, bytes) else image
            return outcome.classified(*await model.infer(slots, pixels))
    except LungserveError as exc:
        return exc


async def decode(service: ServiceState, data: bytes, size: int, allowance: PixelAllowance) -> Pixels:
    """Decode off the event loop, within the request's pixel allowance (`service.core.decode_pool`)."""
    if service.decoder is None:
        raise ModelNotReady("the server is not started")
    image, seconds = await service.decoder.decode(data, size, allowance)
    service.observer.on_decoded(seconds)
    return image


async def classify_all(service: ServiceState, images: Sequence[ImageInput]) -> list[Classified | LungserveError]:
    """A request's images, admitted together into the model serving now (a reload may have
    swapped it while the body came in), under one decode budget."""
    model = service.current()
    allowance = PixelAllowance(service.settings.max_request_pixels)  # one decode budget per request
    # Files refused while they were read take no slot; unused slots return when the block ends.
    with model.reserve(sum(not isinstance(image, LungserveError) for image in images)) as slots:
        return list(
            await asyncio.gather(*(classify_image(service, model, slots, image, allowance) for image in images))
        )
