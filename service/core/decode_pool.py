"""The decode pools and the pixel budgets: one client's huge images cannot starve the rest.

Every image is probed (header only) in the decode pool, charged to its request's
`PixelAllowance` (413 before decoding beyond it), then decoded in the shared pool, or in the
one-thread large-image lane when its decode cost is at least `LUNGSERVE_LARGE_IMAGE_PIXELS`.
The heap is trimmed after each large decode. Why and the bounds: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

from service.core import memory
from service.core.model_client import Pixels
from service.errors import ImageTooLarge
from service.model.preprocess import Probe, load_image, probe_image


class PixelAllowance:
    """One request's decode budget in pixels (decode cost, so JPEG drafts count reduced)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # charged from decode threads: a request's images in parallel

    def charge(self, probe: Probe) -> None:
        with self._lock:
            if self.used + probe.decode_pixels > self.limit:
                raise ImageTooLarge(
                    f"this image ({probe.width}x{probe.height}) would take the request's images over "
                    f"LUNGSERVE_MAX_REQUEST_PIXELS = {self.limit} decoded pixels"
                )
            self.used += probe.decode_pixels


class Decoder:
    """`decode(data, size)` off the event loop: shared pool for tiles, one lane for large images."""

    def __init__(
        self,
        workers: int,
        *,
        max_image_pixels: int,
        large_image_pixels: int,
        trim: Callable[[], object] = memory.trim,
    ) -> None:
        self.max_image_pixels = max_image_pixels
        self.large_image_pixels = large_image_pixels
        self._trim = trim
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-large")

    async def decode(self, data: bytes, size: int, allowance: PixelAllowance | None = None) -> tuple[Pixels, float]:
        """The (size, size, 3) image and the seconds of decode it took; domain errors as raised."""
        loop = asyncio.get_running_loop()
        # Set when the awaiting request is cancelled (deadline, client gone): a decode already
        # running in a thread cannot be cancelled by asyncio, so it stops itself at its next read.
        cancelled = threading.Event()
        try:
            # One thread hop for the common case: probe, charge and decode in the same pool task.
            # Only an image whose decode cost is large moves on, to the large-image lane.
            outcome = await loop.run_in_executor(self._pool, self._probe_then_decode, data, size, allowance, cancelled)
            if isinstance(outcome, Probe):
                return await loop.run_in_executor(self._large, self._decode_large, data, size, cancelled)
            return outcome
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _probe_then_decode(
        self, data: bytes, size: int, allowance: PixelAllowance | None, cancelled: threading.Event
    ) -> Probe | tuple[Pixels, float]:
        """The decoded image, or the probe of an image too large for the shared pool."""
        probe = probe_image(data, size, max_pixels=self.max_image_pixels)
        if allowance is not None:
            allowance.charge(probe)
        if probe.decode_pixels >= self.large_image_pixels:
            return probe
        return self._decode(data, size, cancelled)

    def _decode(self, data: bytes, size: int, cancelled: threading.Event) -> tuple[Pixels, float]:
        started = time.perf_counter()
        # The lane's bound is also load_image's: a large decode keeps Pillow's cancellable reader.
        image = load_image(
            data, size, max_pixels=self.max_image_pixels, cancelled=cancelled, large_pixels=self.large_image_pixels
        )
        return image, time.perf_counter() - started

    def _decode_large(self, data: bytes, size: int, cancelled: threading.Event) -> tuple[Pixels, float]:
        try:
            return self._decode(data, size, cancelled)
        finally:
            self._trim()

    @property
    def pool(self) -> Executor:
        """The shared decode threads: decode-side work of other doors (a large image's tiles,
        Grad-CAM pictures) runs here too, so it shares the same bound on CPU."""
        return self._pool

    @property
    def large_lane(self) -> Executor:
        """The one-thread lane for decodes of large images (a plain image given to /analyze)."""
        return self._large

    def shutdown(self) -> None:
        for pool in (self._pool, self._large):
            pool.shutdown(wait=True, cancel_futures=True)
