"""The streaming multipart reader: field selection, limits and malformed bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.errors import (
    BadRequest,
    ImageTooLarge,
    InsufficientStorage,
    MissingField,
    RequestTooLarge,
    TooManyFiles,
    UnsupportedMediaType,
    UploadTooSlow,
)
from service.http.uploads import (
    MAX_OTHER_PARTS,
    MAX_PREAMBLE_BYTES,
    Upload,
    UploadLimits,
    check_declared_size,
    check_spool_room,
    read_uploads,
)

pytestmark = pytest.mark.anyio

BOUNDARY = "b0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, data: bytes, filename: str | None = "x.jpeg") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return (
        (
            f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def limits(*, max_body_bytes: int = 10_000, fail_fast: bool = False) -> UploadLimits:
    return UploadLimits(
        field="files", max_files=3, max_file_bytes=100, max_body_bytes=max_body_bytes, fail_fast=fail_fast
    )


async def read(data: bytes, lim: UploadLimits, chunk: int = 7, ctype: str = CTYPE) -> list[Upload]:
    return await read_uploads(ctype, chunks(data, chunk), lim)


@pytest.mark.parametrize("chunk", [1, 5, 64, 100_000])
async def test_keeps_the_field_in_order_whatever_the_chunking(chunk: int) -> None:
    data = body(part("files", b"first", "a.png"), part("note", b"ignored", None), part("files", b"", "b.png"))
    uploads = await read_uploads(CTYPE, chunks(data, chunk), limits())
    assert [(u.filename, u.data, u.error) for u in uploads] == [("a.png", b"first", None), ("b.png", b"", None)]


async def test_a_part_without_filename_still_counts() -> None:
    (upload,) = await read(body(part("files", b"raw", None)), limits())
    assert (upload.filename, upload.data) == (None, b"raw")


async def test_too_many_files() -> None:
    data = body(*(part("files", b"x") for _ in range(4)))
    with pytest.raises(TooManyFiles, match="more than 3"):
        await read(data, limits())


async def test_many_tiny_parts_of_other_fields_are_refused_early() -> None:
    # 100,000 empty parts (about 8 MB): refused after the first few dozen, not parsed to the end.
    tiny = part("note", b"", None)
    data = body(part("files", b"x"), *([tiny] * 100_000))
    seen = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal seen
        async for chunk in chunks(data, 4096):
            seen += len(chunk)
            yield chunk

    with pytest.raises(TooManyFiles, match="multipart parts"):
        await read_uploads(CTYPE, counted(), limits(max_body_bytes=len(data)))
    assert seen < (3 + MAX_OTHER_PARTS + 60) * len(tiny)


async def test_oversize_file_is_its_own_error_when_not_failing_fast() -> None:
    data = body(part("files", b"a" * 101, "big.jpeg"), part("files", b"ok", "small.jpeg"))
    big, small = await read(data, limits())
    assert isinstance(big.error, ImageTooLarge)
    assert big.data == b""
    assert small.data == b"ok"


async def test_oversize_file_fails_fast() -> None:
    with pytest.raises(ImageTooLarge):
        await read(body(part("files", b"a" * 101)), limits(fail_fast=True))


async def test_body_limit_while_streaming() -> None:
    data = body(part("files", b"a" * 90), part("files", b"a" * 90))
    with pytest.raises(RequestTooLarge):
        await read(data, limits(max_body_bytes=200))


def test_declared_body_limit() -> None:
    check_declared_size("10000", limits())
    check_declared_size(None, limits())
    check_declared_size("garbage", limits())
    with pytest.raises(RequestTooLarge):
        check_declared_size("10001", limits())
    with pytest.raises(ImageTooLarge):
        check_declared_size("10001", limits(fail_fast=True))


async def test_missing_field_names_what_was_sent() -> None:
    with pytest.raises(MissingField, match="'image'"):
        await read(body(part("image", b"x")), limits())
    with pytest.raises(MissingField):
        await read(body(), limits())


@pytest.mark.parametrize("ctype", ["application/json", "", "image/jpeg", "multipart/mixed; boundary=x"])
async def test_not_multipart(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        await read(b"{}", limits(), ctype=ctype)


async def test_no_boundary() -> None:
    with pytest.raises(BadRequest, match="boundary"):
        await read(b"", limits(), ctype="multipart/form-data")


async def test_unterminated_body() -> None:
    data = body(part("files", b"x"))[:-10]
    with pytest.raises(BadRequest, match="closing boundary"):
        await read(data, limits())


async def test_garbage_body() -> None:
    with pytest.raises(BadRequest, match="malformed"):
        await read(b"this is not multipart at all", limits())


async def test_part_without_name() -> None:
    data = f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()
    with pytest.raises(BadRequest, match="no name"):
        await read(data, limits())


# --- issue 10: preamble, slow bodies --------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 64, 100_000])
async def test_a_preamble_before_the_first_boundary_is_skipped(chunk: int) -> None:
    # RFC 2046 5.1.1 allows text before the first delimiter line; it is not a part.
    data = b"This is a multi-part message in MIME format.\r\n" + body(part("files", b"payload", "a.png"))
    (upload,) = await read(data, limits(), chunk=chunk)
    assert (upload.filename, upload.data) == ("a.png", b"payload")


async def test_a_body_without_any_boundary_line_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="no boundary"):
        await read(b"x" * 100, limits())
    with pytest.raises(BadRequest, match="no boundary within"):
        await read(b"y" * (MAX_PREAMBLE_BYTES + 10), limits(max_body_bytes=10 * MAX_PREAMBLE_BYTES))


async def test_a_stalled_body_is_refused_as_too_slow() -> None:
    stalled = asyncio.Event()  # never set: the client sent one chunk, then nothing

    async def trickle() -> AsyncIterator[bytes]:
        yield f"--{BOUNDARY}\r\n".encode()
        await stalled.wait()
        yield b"never"

    slow = UploadLimits(
        field="files",
        max_files=1,
        max_file_bytes=100,
        max_body_bytes=1000,
        fail_fast=True,
        min_rate_bytes_s=1000.0,
        rate_grace_s=0.05,
    )
    with pytest.raises(UploadTooSlow) as info:
        await read_uploads(CTYPE, trickle(), slow)
    assert info.value.status == 408


async def test_an_outer_timeout_is_not_reported_as_a_slow_upload() -> None:
    async def forever() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()
        yield b""

    patient = UploadLimits(
        field="files",
        max_files=1,
        max_file_bytes=100,
        max_body_bytes=1000,
        fail_fast=True,
        min_rate_bytes_s=1.0,
        rate_grace_s=3600.0,
    )
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await read_uploads(CTYPE, forever(), patient)


def test_a_body_declaring_more_than_the_spool_disk_has_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(InsufficientStorage) as info:
        check_spool_room(str(tmp_path), str(2**62))
    assert info.value.status == 507
    check_spool_room(str(tmp_path), "1024")
    check_spool_room(str(tmp_path), None)  # chunked: the write will tell
