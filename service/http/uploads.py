"""Streaming multipart/form-data reader with the service's upload limits.

Parsed here (python-multipart's callback parser, as Starlette uses) rather than with
`request.form()`, so that every limit (files, file bytes, body bytes, upload rate) gives its own
JSON error the moment it is crossed, before the whole body is read. Files stay in memory,
bounded by `max_body_bytes`. The limits and why: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    BadRequest,
    ImageTooLarge,
    InsufficientStorage,
    LungserveError,
    MissingField,
    RequestTooLarge,
    TooManyFiles,
    UnsupportedMediaType,
    UploadTooSlow,
)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

    from service.settings import Settings

# Room for multipart boundaries and part headers around one file in /predict.
MULTIPART_OVERHEAD_BYTES: Final = 64 * 1024
# How many unexpected field names to quote back in a missing_field message.
_MAX_NAMES_REPORTED: Final = 5
# Parts of other fields a request may carry besides its files (a form's extra inputs).
MAX_OTHER_PARTS: Final = 32
# Longest preamble skipped before the first boundary; beyond it the body is malformed.
MAX_PREAMBLE_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    field: str
    max_files: int
    max_file_bytes: int
    max_body_bytes: int
    # True for /predict: a too-large file fails the request at once (no point reading on).
    # False for /predict-many: it becomes that file's error and the others go on.
    fail_fast: bool
    # A body must arrive at this average rate once `rate_grace_s` has passed (None: no floor).
    # One rule covers both a stalled client and one trickling bytes to hold a slot.
    min_rate_bytes_s: float | None = None
    rate_grace_s: float = 5.0


@dataclass(frozen=True)
class RouteLimits:
    """The upload limits of each route, built once per app from its settings."""

    predict: UploadLimits
    predict_many: UploadLimits
    slide: UploadLimits  # /analyze and POST /jobs: one large file, spooled to disk

    @classmethod
    def from_settings(cls, settings: Settings) -> RouteLimits:
        rate = settings.min_upload_rate_bytes_s or None  # 0: no minimum rate
        return cls(
            predict=UploadLimits(
                field="file",
                max_files=1,
                max_file_bytes=settings.max_file_bytes,
                max_body_bytes=settings.max_file_bytes + MULTIPART_OVERHEAD_BYTES,
                fail_fast=True,
                min_rate_bytes_s=rate,
                rate_grace_s=settings.upload_rate_grace_s,
            ),
            predict_many=UploadLimits(
                field="files",
                max_files=settings.max_files_per_request,
                max_file_bytes=settings.max_file_bytes,
                max_body_bytes=settings.max_request_bytes,
                fail_fast=False,
                min_rate_bytes_s=rate,
                rate_grace_s=settings.upload_rate_grace_s,
            ),
            slide=UploadLimits(
                field="file",
                max_files=1,
                max_file_bytes=settings.max_slide_bytes,
                max_body_bytes=settings.max_slide_bytes + MULTIPART_OVERHEAD_BYTES,
                fail_fast=True,
                # The same minimum upload rate as every other door: a trickled slide holds a slot too.
                min_rate_bytes_s=rate,
                rate_grace_s=settings.upload_rate_grace_s,
            ),
        )


@dataclass
class Upload:
    """One file of the expected field, in upload order: its bytes or why it was refused."""

    filename: str | None
    data: bytes = b""
    error: LungserveError | None = None
    # With `read_uploads(..., spool=...)` the bytes went to this file instead of `data`.
    file: BinaryIO | None = None

    @property
    def image(self) -> bytes | LungserveError:
        """What the pipeline classifies: the bytes, or the error the file already got."""
        return self.error if self.error is not None else self.data


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    upload: Upload | None = None  # None: a part of another field, discarded
    buffer: bytearray = field(default_factory=bytearray)
    size: int = 0


def spool_error(exc: OSError) -> LungserveError | OSError:
    """A full spool disk is the server's condition, not a bug: 507, and the request's files go."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InsufficientStorage("no space left for the upload on the server's temporary disk (TMPDIR)")
    return exc


def close_spooled(handle: BinaryIO) -> None:
    """Close a spooled upload: its buffered last bytes are written now, so a full disk shows here too."""
    try:
        handle.close()
    except OSError as exc:
        raise spool_error(exc) from exc


def check_spool_room(directory: str, content_length: str | None) -> None:
    """A body that declares more bytes than the spool disk has free is refused (507) before it is read."""
    length = declared_length(content_length)
    if length is None:
        return  # chunked: a full disk shows at the write (507 too)
    free = shutil.disk_usage(directory).free
    if length > free:
        raise InsufficientStorage(
            f"the upload declares {length} bytes and the server's temporary disk (TMPDIR) has {free} free"
        )


def declared_length(content_length: str | None) -> int | None:
    if content_length is None:
        return None
    try:
        value = int(content_length)
    except ValueError:
        return None
    return value if value >= 0 else None


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _first_boundary(buffer: bytearray, boundary: bytes) -> int | None:
    """Offset of the first delimiter line in `buffer`; None while more bytes are needed."""
    delimiter = b"--" + boundary
    if buffer.startswith(delimiter):
        return 0
    found = buffer.find(b"\r\n" + delimiter)
    if found >= 0:
        return found + 2
    if len(buffer) > MAX_PREAMBLE_BYTES:
        raise BadRequest(f"malformed multipart body: no boundary within its first {MAX_PREAMBLE_BYTES} bytes")
    return None


async def paced(stream: AsyncIterator[bytes], limits: UploadLimits) -> AsyncIterator[bytes]:
    """`stream`, refusing a body that falls behind `limits.min_rate_bytes_s` (408). Every door
    reads its body through this."""
    rate = limits.min_rate_bytes_s
    if rate is None:
        async for chunk in stream:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    iterator = aiter(stream)
    while True:
        # The next byte is due when the average would drop below the floor.
        timeout = asyncio.timeout_at(started + limits.rate_grace_s + received / rate)
        try:
            async with timeout:
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not timeout.expired():
                raise  # an outer deadline, not ours
            raise UploadTooSlow(
                f"the request body arrived slower than LUNGSERVE_MIN_UPLOAD_RATE_BYTES_S = {rate:g} bytes/s "
                f"({received} bytes after {loop.time() - started:.1f} s)"
            ) from None
        received += len(chunk)
        yield chunk


def check_declared_size(content_length: str | None, limits: UploadLimits) -> None:
    """Refuse a body whose Content-Length is already over the limit, before reading it."""
    length = declared_length(content_length)
    if length is not None and length > limits.max_body_bytes:
        raise _body_too_large(limits, length)


def _body_too_large(limits: UploadLimits, length: int | None) -> LungserveError:
    size = f"{length} bytes" if length is not None else f"more than {limits.max_body_bytes} bytes"
    if limits.fail_fast:
        return ImageTooLarge(f"request body is {size}; the limit for one file is {limits.max_file_bytes} bytes")
    return RequestTooLarge(f"request body is {size}; the limit is {limits.max_body_bytes} bytes")


async def read_uploads(
    content_type: str | None,
    stream: AsyncIterator[bytes],
    limits: UploadLimits,
    spool: Callable[[], BinaryIO] | None = None,
) -> list[Upload]:
    """Parse a multipart body, keeping only the parts named `limits.field`.

    With `spool`, each kept file is written to a new file from `spool()` rather than held in
    memory (large images for /analyze: a slide can be gigabytes).
    """
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"expected a multipart/form-data body with field {limits.field!r}, "
            f"got {ctype.decode('latin-1') or 'no content type'}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")

    uploads: list[Upload] = []
    other_names: list[str] = []
    part = _Part()
    header_name = bytearray()
    header_value = bytearray()
    finished = False

    parts = 0

    def on_part_begin() -> None:
        nonlocal part, parts
        parts += 1
        if parts > limits.max_files + MAX_OTHER_PARTS:
            raise TooManyFiles(
                f"more than {limits.max_files + MAX_OTHER_PARTS} multipart parts "
                f"(at most {limits.max_files} file(s) in field {limits.field!r} and {MAX_OTHER_PARTS} others)"
            )
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part.headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, options = parse_options_header(part.headers.get(b"content-disposition"))
        raw_name = options.get(b"name")
        if raw_name is None:
            raise BadRequest("a multipart part has no name in its Content-Disposition header")
        name = _decode(raw_name)
        if name != limits.field:
            if name not in other_names and len(other_names) < _MAX_NAMES_REPORTED:
                other_names.append(name)
            return
        if len(uploads) >= limits.max_files:
            raise TooManyFiles(f"more than {limits.max_files} file(s) in field {limits.field!r}")
        raw_filename = options.get(b"filename")
        part.upload = Upload(filename=_decode(raw_filename) if raw_filename is not None else None)
        if spool is not None:
            try:
                part.upload.file = spool()
            except OSError as exc:
                raise spool_error(exc) from exc
        uploads.append(part.upload)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        upload = part.upload
        if upload is None or upload.error is not None:
            return  # another field, or a file already refused: drop the bytes
        part.size += end - start
        if part.size > limits.max_file_bytes:
            error = ImageTooLarge(f"file is larger than the limit of {limits.max_file_bytes} bytes")
            if limits.fail_fast:
                raise error
            upload.error = error
            part.buffer = bytearray()
            return
        if upload.file is not None:
            try:
                upload.file.write(data[start:end])
            except OSError as exc:
                raise spool_error(exc) from exc
        else:
            part.buffer.extend(data[start:end])

    def on_part_end() -> None:
        if part.upload is not None and part.upload.error is None:
            part.upload.data = bytes(part.buffer)
        part.buffer = bytearray()

    def on_end() -> None:
        nonlocal finished
        finished = True

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        received = 0
        preamble: bytearray | None = bytearray()  # None once the first boundary was found
        async for chunk in paced(stream, limits):
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise _body_too_large(limits, None)
            if preamble is not None:
                preamble.extend(chunk)
                start = _first_boundary(preamble, boundary)
                if start is None:
                    continue
                chunk, preamble = bytes(preamble[start:]), None
            parser.write(chunk)
        if preamble is not None:
            raise BadRequest("malformed multipart body: no boundary line found")
        parser.finalize()
    except FormParserError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    except ClientDisconnect as exc:
        raise BadRequest("the client disconnected before the request body was complete") from exc
    if not finished:
        raise BadRequest("malformed multipart body: it ends before the closing boundary")
    if not uploads:
        sent = f"; the body has field(s) {', '.join(map(repr, other_names))}" if other_names else ""
        raise MissingField(f"no file in multipart field {limits.field!r}{sent}")
    return uploads


@dataclass(frozen=True)
class MultipartBody:
    """A multipart upload as `service.core.admission` admits it (a `BodyReader`)."""

    content_type: str | None
    content_length: str | None
    stream: AsyncIterator[bytes]
    limits: UploadLimits
    spool: Callable[[], BinaryIO] | None = None

    @classmethod
    def of(cls, request: Request, limits: UploadLimits, spool: Callable[[], BinaryIO] | None = None) -> MultipartBody:
        headers = request.headers
        return cls(headers.get("content-type"), headers.get("content-length"), request.stream(), limits, spool)

    def check(self) -> None:
        check_declared_size(self.content_length, self.limits)

    @property
    def charge(self) -> int:
        # A spooled body goes to disk as it arrives: it holds an upload slot, not memory.
        if self.spool is not None:
            return 0
        declared = declared_length(self.content_length)
        return declared if declared is not None else self.limits.max_body_bytes

    async def read(self) -> list[Upload]:
        return await read_uploads(self.content_type, self.stream, self.limits, self.spool)
