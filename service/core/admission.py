"""Admission: the one way in for every door, before a byte of the body is read.

Order: readiness, the body's cheap header checks (declared size: 413), a queue pre-check and
the upload gate (503 with Retry-After), then the body at the minimum rate. Queue slots are taken
only after the body is in memory, so a slow client never holds one (docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Protocol, TypeVar

from service.core import memory
from service.core.model_client import ModelClient
from service.errors import Overloaded

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

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
        refusal = self._refusal(charge)
        if refusal is None:
            self.uploads += 1
            self.body_bytes += charge
            return BodyTicket(self, charge)
        raise Overloaded(refusal, retry_after_s=self.retry_after_s)

    def _refusal(self, charge: int) -> str | None:
        if self.uploads >= self.max_uploads:
            return f"the server is receiving {self.uploads} uploads (LUNGSERVE_MAX_UPLOADS_IN_FLIGHT); retry shortly"
        if self.body_bytes + charge > self.max_body_bytes:
            return (
                f"the server holds {self.body_bytes} bytes of request bodies and this one declares {charge} "
                f"(LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT = {self.max_body_bytes}); retry shortly"
            )
        return None


class BodyReader(Protocol[T_co]):
    """A door's request body: checks that cost nothing, what it charges, and how it is read."""

    def check(self) -> None:
        """Refuse from the headers alone (declared size 413, encoding 415): no byte read yet."""

    @property
    def charge(self) -> int:
        """Body bytes to hold against LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT (0: spooled to disk)."""
        ...

    async def read(self) -> T_co:
        """The body, at the minimum upload rate."""
        ...


@asynccontextmanager
async def admit(
    model: ModelClient, gate: UploadGate, body: BodyReader[T], *, needs_queue: bool = True
) -> AsyncIterator[T]:
    """Admit one request and read its body; its bytes are released when the block ends.

    A full queue answers 503 before the body is read (it would only be refused after it
    arrived); the caller reserves queue slots for what the body holds. `needs_queue=False`:
    a slide job, which waits for the queue later, queued.
    """
    body.check()
    if needs_queue and not model.has_room():
        model.reserve(1).release()  # raises the usual 503 overloaded, with Retry-After
    with gate.admit(body.charge) as ticket:
        content = await body.read()
        ticket.body_read()
        yield content
