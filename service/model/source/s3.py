"""Models in S3 (aioboto3): read the manifest, stream the model into the cache, poll the ETag.

The model is hashed while it streams to a temporary file and renamed into place only once it
matches the manifest's sha256, so a cache file is always complete and correct. Credentials come
from the standard AWS chain; botocore's "standard" mode retries. Imported only for s3:// URIs
(aioboto3 and botocore cost tens of MiB). The layout: docs/model_contract.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from service import __version__
from service.errors import ModelSourceError, one_line
from service.model.manifest import check_sha256, parse_manifest
from service.model.source import cache
from service.model.source.artifact import ModelArtifact, ModelIdentity
from service.model.source.uri import S3Location, S3Options

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1 << 20
# A manifest is a few KiB; anything much larger is not one, and is not read into memory.
MAX_MANIFEST_BYTES: Final = 1 << 20

_CREDENTIAL_ERRORS: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)


def s3_client_config(options: S3Options | None = None) -> AioConfig:
    """botocore retries transient errors itself ("standard": connection errors, 5xx, throttling,
    exponential backoff with jitter); we add no retry loop of our own."""
    options = options or S3Options()
    return AioConfig(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        # `total_max_attempts` counts the first try; botocore's `max_attempts` key would count retries only.
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},
        user_agent_extra=f"lungserve/{__version__}",
        # The model's sha256 is verified end to end; the SDK's extra CRC trailers only break
        # older MinIO / Ceph gateways, so send and check them only where the API requires it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def client(options: S3Options, session: aioboto3.Session | None = None) -> AbstractAsyncContextManager[S3Client]:
    """An S3 client for `options`; credentials from the standard AWS chain unless `session` says."""
    session = session or aioboto3.Session()
    return session.client(
        "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=s3_client_config(options)
    )


def describe_s3_error(
    exc: Exception, *, uri: str, what: str, endpoint_url: str | None, max_attempts: int, writing: bool = False
) -> ModelSourceError:
    """One line naming the cause of a failed S3 call; `what` is e.g. 'manifest' or 'model'."""
    where = endpoint_url or "AWS S3"
    verb, permission = ("writing", "s3:PutObject") if writing else ("reading", "s3:GetObject")
    bucket = urlsplit(uri).netloc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = one_line(error.get("Message", ""), 160)
        if code == "NoSuchBucket":
            return ModelSourceError(f"bucket {bucket!r} does not exist ({where}), {verb} {what} {uri}")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return ModelSourceError(f"{what} not found: {uri} ({where})")
        if code in _CREDENTIAL_ERRORS:
            return ModelSourceError(f"credentials rejected by {where} ({code}) {verb} {what} {uri}")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return ModelSourceError(
                f"access denied {verb} {what} {uri} ({where}): the credentials from the AWS chain "
                f"lack {permission} on it"
            )
        return ModelSourceError(f"S3 error {code or status} {verb} {what} {uri} ({where}): {message}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return ModelSourceError(
            f"no usable AWS credentials for {uri} ({one_line(exc, 120)}); set them through the standard "
            "chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity or an instance role"
        )
    if isinstance(exc, ReadTimeoutError):
        return ModelSourceError(f"{where} stopped answering while {verb} {what} {uri}: {one_line(exc, 160)}")
    if isinstance(exc, ConnectionError):  # botocore's: refused, DNS, connect timeout, proxy, TLS
        return ModelSourceError(
            f"S3 endpoint {where} unreachable after {max_attempts} attempt(s) {verb} {what} {uri}: {one_line(exc, 160)}"
        )
    if isinstance(exc, HTTPClientError):  # connection closed / reset mid-response
        return ModelSourceError(f"transfer of {what} {uri} ({where}) was interrupted: {one_line(exc, 160)}")
    if isinstance(exc, BotoCoreError):
        return ModelSourceError(f"S3 request for {what} {uri} ({where}) failed: {one_line(exc, 160)}")
    return ModelSourceError(f"{verb} {what} {uri} ({where}) failed: {type(exc).__name__}: {one_line(exc, 160)}")


def _write_and_hash(fh: IO[bytes], hasher: Any, chunk: bytes) -> None:
    fh.write(chunk)
    hasher.update(chunk)


async def download_object(
    s3: S3Client, bucket: str, key: str, dest: Path, *, sha256: str, chunk_size: int = CHUNK_SIZE
) -> int:
    """Stream s3://bucket/key into `dest` and return its size. Never holds the object in memory.

    The bytes go to a temporary file beside `dest` and are hashed on the way; only a file whose
    sha256 matches is renamed (atomically) to `dest`. botocore errors propagate unchanged.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        hasher = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as fh:
            response = await s3.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            # The context releases (or drops) the connection even when we stop early.
            async with body:
                async for chunk in body.iter_chunks(chunk_size):
                    # Disk writes and hashing off the event loop: a reload runs beside live traffic.
                    await asyncio.to_thread(_write_and_hash, fh, hasher, chunk)
                    size += len(chunk)
            fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
        check_sha256(hasher.hexdigest(), sha256, f"s3://{bucket}/{key}")
        os.replace(tmp, dest)
        return size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


async def _read_manifest(s3: S3Client, loc: S3Location, options: S3Options) -> tuple[bytes, str | None, str | None]:
    uri = loc.uri(loc.manifest_key)
    try:
        response = await s3.get_object(Bucket=loc.bucket, Key=loc.manifest_key)
        body = response["Body"]
        async with body:
            if response.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
                raise ModelSourceError(f"{uri} is {response['ContentLength']} bytes: not a model manifest")
            data = await body.read()
    except ModelSourceError:
        raise
    except (ClientError, BotoCoreError) as exc:
        raise describe_s3_error(
            exc, uri=uri, what="manifest", endpoint_url=options.endpoint_url, max_attempts=options.max_attempts
        ) from exc
    etag = response.get("ETag")
    return data, etag.strip('"') if etag else None, response.get("VersionId")


async def fetch_s3(
    loc: S3Location, *, uri: str, cache_dir: Path, options: S3Options, session: aioboto3.Session | None = None
) -> ModelArtifact:
    """Manifest, then the model it names (or the verified cache copy). Checksum verified."""
    async with client(options, session) as s3:
        data, etag, version_id = await _read_manifest(s3, loc, options)
        manifest = parse_manifest(data, loc.uri(loc.manifest_key))
        model_key = loc.model_key or loc.prefix + manifest.file
        if model_key.rpartition("/")[2] != manifest.file:
            raise ModelSourceError(
                f"manifest {loc.uri(loc.manifest_key)} describes {manifest.file!r}, not {loc.uri(model_key)}"
            )
        folder = cache.cache_subdir(cache_dir, loc)
        folder.mkdir(parents=True, exist_ok=True)
        cached = cache.cached_model(folder, manifest)
        downloaded = 0
        if await asyncio.to_thread(cache.is_verified, cached, manifest):
            log.info("model %s %s: verified cache hit, nothing to download", manifest.name, manifest.version)
            os.utime(cached)  # "recently used" for pruning
        else:
            log.info("downloading model %s %s from %s", manifest.name, manifest.version, loc.uri(model_key))
            try:
                downloaded = await download_object(s3, loc.bucket, model_key, cached, sha256=manifest.sha256)
            except (ClientError, BotoCoreError) as exc:
                raise describe_s3_error(
                    exc,
                    uri=loc.uri(model_key),
                    what="model",
                    endpoint_url=options.endpoint_url,
                    max_attempts=options.max_attempts,
                ) from exc
        await asyncio.to_thread(cache.atomic_write, cached.with_suffix(".json"), data)
    await asyncio.to_thread(cache.prune, folder, manifest.sha256)
    identity = ModelIdentity.of(manifest, source=uri, etag=etag, version_id=version_id)
    return ModelArtifact(cached, manifest, identity, downloaded_bytes=downloaded)


async def manifest_etag(loc: S3Location, options: S3Options, session: aioboto3.Session | None = None) -> str | None:
    """The manifest object's ETag (HEAD, no body), for cheap reload polling."""
    async with client(options, session) as s3:
        try:
            head = await s3.head_object(Bucket=loc.bucket, Key=loc.manifest_key)
        except (ClientError, BotoCoreError) as exc:
            error = describe_s3_error(
                exc,
                uri=loc.uri(loc.manifest_key),
                what="manifest",
                endpoint_url=options.endpoint_url,
                max_attempts=options.max_attempts,
            )
            if isinstance(exc, ClientError) and "not found" in str(error):
                # HEAD answers carry no error code: tell a missing bucket from a missing key.
                with contextlib.suppress(ClientError, BotoCoreError):
                    await s3.head_bucket(Bucket=loc.bucket)
                    raise error from exc
                raise ModelSourceError(
                    f"bucket {loc.bucket!r} does not exist or is not readable ({options.where})"
                ) from exc
            raise error from exc
    etag = head.get("ETag")
    return etag.strip('"') if etag else None
