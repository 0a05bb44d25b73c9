"""The job store on S3 (aioboto3), and slides read from `s3://` URIs.

Same client options and error messages as the model source (`service.model.source.s3`):
botocore's standard retries, credentials from the AWS chain, one line naming the cause.
Large objects (uploaded slides) go through the SDK's managed multipart transfer and are
streamed back to a local file, never held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Final

from botocore.exceptions import BotoCoreError, ClientError

from service.errors import LungserveError
from service.jobs.errors import JobStoreError, SourceTooLarge
from service.model.source.s3 import client, describe_s3_error
from service.model.source.uri import S3Options, parse_slide_uri

CHUNK_SIZE: Final = 1 << 20


class SlideUnreadable(LungserveError):
    """The job's s3:// slide cannot be read (missing, denied, unreachable): the job fails with this."""

    code = "slide_unreadable"
    status = 422


class S3JobStore:
    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.options = options

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _error(self, exc: Exception, key: str, *, writing: bool = False) -> JobStoreError:
        described = describe_s3_error(
            exc,
            uri=f"s3://{self.bucket}/{self._key(key)}",
            what="job data",
            endpoint_url=self.options.endpoint_url,
            max_attempts=self.options.max_attempts,
            writing=writing,
        )
        return JobStoreError(f"job store: {described}")

    async def put_bytes(self, key: str, data: bytes) -> None:
        async with client(self.options) as s3:
            try:
                await s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, key, writing=True) from exc

    async def get_bytes(self, key: str) -> bytes | None:
        async with client(self.options) as s3:
            try:
                response = await s3.get_object(Bucket=self.bucket, Key=self._key(key))
                body = response["Body"]
                async with body:
                    data: bytes = await body.read()
                    return data
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise self._error(exc, key) from exc
            except BotoCoreError as exc:
                raise self._error(exc, key) from exc

    async def put_file(self, key: str, path: Path) -> None:
        async with client(self.options) as s3:
            try:
                await s3.upload_file(str(path), self.bucket, self._key(key))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, key, writing=True) from exc
        await asyncio.to_thread(path.unlink, missing_ok=True)  # the store has it now

    async def fetch_file(self, key: str, dest: Path) -> Path:
        try:
            await download(self.bucket, self._key(key), dest, self.options, max_bytes=None)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from exc
        return dest

    async def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        async with client(self.options) as s3:
            try:
                paginator = s3.get_paginator("list_objects_v2")
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                    found.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, prefix) from exc
        return sorted(found)

    async def job_ids(self) -> list[str]:
        ids: list[str] = []
        async with client(self.options) as s3:
            try:
                paginator = s3.get_paginator("list_objects_v2")
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"):
                    ids.extend(p["Prefix"][len(self.prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "") from exc
        return sorted(ids)

    async def delete(self, key: str) -> None:
        async with client(self.options) as s3:
            try:
                await s3.delete_object(Bucket=self.bucket, Key=self._key(key))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, key, writing=True) from exc


async def download(bucket: str, key: str, dest: Path, options: S3Options, *, max_bytes: int | None) -> int:
    """Stream s3://bucket/key to `dest` (renamed into place when complete); its size.

    `max_bytes`: the object's declared size is checked first (413 before a byte is fetched),
    and the stream is cut off if it grows past it anyway.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        size = 0
        with os.fdopen(fd, "wb") as fh:
            async with client(options) as s3:
                response = await s3.get_object(Bucket=bucket, Key=key)
                body = response["Body"]
                async with body:  # (the context yields the raw response: iterate the stream itself)
                    declared = int(response.get("ContentLength", 0))
                    if max_bytes is not None and declared > max_bytes:
                        raise SourceTooLarge(
                            f"the slide is {declared} bytes, over LUNGSERVE_MAX_SLIDE_BYTES ({max_bytes})"
                        )
                    async for chunk in body.iter_chunks(CHUNK_SIZE):
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise SourceTooLarge(f"the slide is over LUNGSERVE_MAX_SLIDE_BYTES ({max_bytes})")
                        await asyncio.to_thread(fh.write, chunk)
        os.replace(tmp, dest)
        return size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


async def fetch_slide(uri: str, dest: Path, options: S3Options, *, max_bytes: int) -> Path:
    """A job's `{"uri": "s3://..."}` slide, downloaded to `dest` (size-checked first)."""
    bucket, key = parse_slide_uri(uri)
    try:
        await download(bucket, key, dest, options, max_bytes=max_bytes)
    except (ClientError, BotoCoreError) as exc:
        described = describe_s3_error(
            exc, uri=uri, what="slide", endpoint_url=options.endpoint_url, max_attempts=options.max_attempts
        )
        raise SlideUnreadable(str(described)) from exc
    return dest
