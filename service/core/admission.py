"""Admission of request bodies: a bounded pool for bodies in flight, checked before reading.

The batcher's queue bounds *images being classified*; it must not be held by a client that is
still uploading (issue 10, row 5: 32 uploads at 10 bytes/s kept a queue of 32 full). So a
request passes two gates, in this order:

1. `UploadGate.admit(charge)`, before a byte of the body is read: one of
   `LUNGSERVE_MAX_UPLOADS_IN_FLIGHT` upload slots, held until the body has been read, and
   `charge` bytes of `LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT`, held until the response (the bytes
   stay in memory until their images are decoded). The charge is the declared Content-Length,
   or the route's whole limit for a chunked body. Either gate full -> 503 `overloaded` with
   Retry-After, before reading: eight 120 MB bodies cannot all be buffered (row 9).
2. The batcher's queue (`reserve`), only once the body is in memory and its images counted.

A slow body is cut off by the minimum upload rate (`service.http.uploads`), which frees its upload
slot; the reverse proxy in front (docs/reliability.md) is the first line against slow clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from service.core import memory
from service.errors import ModelNotReady, Overloaded
from service.http.uploads import Upload, UploadLimits, check_declared_size, declared_length, read_uploads

if TYPE_CHECKING:
    from service.core.runtime import ServiceState

# Bodies at least this large trigger a heap trim when released (see service.core.memory).
_TRIM_AFTER_BYTES = 8 * 1024 * 1024


class BodyTicket:
    """One admitted body: an upload slot until `body_read()`, its bytes until `close()`."""

    def __init__(self, gate: UploadGate, charge: int) -> None:
        self._gate = gate
        self.charge = charge
        self._uploading = True
        self._open = True

    def body_read(self) -> None:
        """The body is in memory: the upload slot goes to the next client. Idempotent."""
        if self._uploading:
            self._uploading = False
            self._gate.uploads -= 1

    def close(self) -> None:
        """The request is answered: its bytes are released. Idempotent."""
        self.body_read()
        if self._open:
            self._open = False
            self._gate.body_bytes -= self.charge
            if self.charge >= _TRIM_AFTER_BYTES and self._gate.trimmer is not None:
                self._gate.trimmer.mark()

    def __enter__(self) -> BodyTicket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class UploadGate:
    """Counts bodies being uploaded and body bytes held; refuses (503) rather than queue."""

    def __init__(
        self, max_uploads: int, max_body_bytes: int, retry_after_s: int, trimmer: memory.Trimmer | None = None
    ) -> None:
        self.trimmer = trimmer  # heap trim once a large body's request is gone (service.core.memory)
        self.max_uploads = max_uploads
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s
        self.uploads = 0
        self.body_bytes = 0

    def admit(self, charge: int) -> BodyTicket:
        """Take an upload slot and `charge` bytes now, or raise Overloaded. No awaits."""
        if self.uploads >= self.max_uploads:
            raise Overloaded(
                f"the server is receiving {self.uploads} uploads (LUNGSERVE_MAX_UPLOADS_IN_FLIGHT); retry shortly",
                retry_after_s=self.retry_after_s,
            )
        if self.body_bytes + charge > self.max_body_bytes:
            raise Overloaded(
                f"the server holds {self.body_bytes} bytes of request bodies and this one declares {charge} "
                f"(LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT = {self.max_body_bytes}); retry shortly",
                retry_after_s=self.retry_after_s,
            )
        self.uploads += 1
        self.body_bytes += charge
        return BodyTicket(self, charge)


@asynccontextmanager
async def admitted_uploads(
    service: ServiceState,
    content_type: str | None,
    content_length: str | None,
    stream: AsyncIterator[bytes],
    limits: UploadLimits,
    spool: Callable[[], BinaryIO] | None = None,
    *,
    needs_queue: bool = True,
) -> AsyncIterator[list[Upload]]:
    """Every upload route's way in: the checks that cost nothing, the gate, then the body.

    Before a byte is read: not ready / shutting down (503), declared size (413), a full queue
    (503: the body would only be refused after it arrived), the upload gate (503). Then the
    body, at the minimum rate (408). The caller reserves queue slots for what it got; the
    body's bytes are released when the `async with` block ends. `needs_queue=False` (a slide
    job: it waits for the queue later, queued) skips the full-queue check.
    """
    runtime = service.current()
    check_declared_size(content_length, limits)
    if needs_queue and runtime.batcher.available == 0:
        runtime.reserve(1).release()  # raises the usual 503 overloaded, with Retry-After
    gate = service.upload_gate
    if gate is None:
        raise ModelNotReady("the server is not started")
    declared = declared_length(content_length)
    # A spooled body goes to disk as it arrives: it holds an upload slot, not memory.
    charge = 0 if spool is not None else (declared if declared is not None else limits.max_body_bytes)
    with gate.admit(charge) as ticket:
        uploads = await read_uploads(content_type, stream, limits, spool)
        ticket.body_read()
        yield uploads
