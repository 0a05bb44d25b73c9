"""Where the model comes from: a local folder or an S3 prefix, always verified before use.

`fetch_model(uri, ...)` is the one entry point the app uses at startup and on reload:

* a local path (or `file://` URI) is read in place;
* `s3://bucket/prefix/` reads `prefix/model.json` and then the file it names, `s3://bucket/key.onnx`
  reads the `model.json` beside the key. The model is streamed to a temporary file in the cache
  directory while it is hashed, checked against the manifest's sha256 and only then renamed into
  place, so a cache file is always complete and correct; a restart whose cached file already has
  the manifest's sha256 downloads nothing.

Every returned `ModelArtifact` has passed the checksum *and* `verify_onnx` (ONNX Runtime can load
it, its signature fits the manifest and a test inference yields probabilities). Every failure is a
`ModelSourceError` with a one-line message naming the cause.

Credentials come only from the standard AWS chain (environment, shared profile, web identity,
container/instance role) through `aioboto3.Session()`. Transient errors (connection refused, 5xx,
throttling) are retried by botocore's own "standard" retry mode with exponential backoff; the whole
fetch is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

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
from pydantic import ValidationError

from service import __version__
from service.errors import ModelSourceError
from service.manifest import MANIFEST_NAME, Manifest, sha256_file

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from service.settings import Settings

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 1 << 20
# A manifest is a few KiB; anything much larger is not one, and is not read into memory.
MAX_MANIFEST_BYTES: Final = 1 << 20
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
DEFAULT_READ_TIMEOUT_S: Final = 60.0
DEFAULT_MAX_ATTEMPTS: Final = 5
DEFAULT_TIMEOUT_S: Final = 300.0

_CREDENTIAL_ERRORS: Final = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelArtifact:
    """A model file on local disk that has passed every check, and where it came from."""

    onnx_path: Path
    manifest: Manifest
    source: str
    """The URI it was fetched from (a local path for local models)."""
    etag: str | None = None
    """S3 ETag of the manifest object (what reload polling compares); None for local models."""
    version_id: str | None = None
    """S3 VersionId of the manifest object on a versioned bucket, else None."""
    downloaded_bytes: int = 0
    """Bytes of model fetched over the network: 0 for a local model or a verified cache hit."""

    @property
    def version(self) -> str:
        """The manifest's version: the name operators and answers use for this model."""
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    @property
    def downloaded(self) -> bool:
        return self.downloaded_bytes > 0

    def describe(self) -> dict[str, str | None]:
        """Identity of this model for `GET /model`, logs and the model-info metric."""
        return {
            "name": self.manifest.name,
            "version": self.version,
            "sha256": self.sha256,
            "source": self.source,
            "etag": self.etag,
            "version_id": self.version_id,
        }


# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class LocalLocation:
    path: Path


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """The "folder" holding the manifest: '' or ends with '/'."""
    manifest_key: str
    model_key: str | None
    """Set when the URI names the .onnx object itself; otherwise the manifest's `file` decides."""

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def parse_model_uri(uri: str) -> LocalLocation | S3Location:
    """`s3://bucket/prefix/`, `s3://bucket/key.onnx`, `s3://bucket/prefix/model.json`,
    `file:///path` or a plain path. Pure; raises ModelSourceError for anything else."""
    uri = uri.strip()
    if not uri:
        raise ModelSourceError("empty model URI")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise ModelSourceError(f"model URI {uri!r} has no bucket (expected s3://bucket/prefix/)")
        if parts.query or parts.fragment:
            raise ModelSourceError(f"model URI {uri!r}: query strings and fragments are not supported")
        key = parts.path.lstrip("/")
        if key.endswith(".onnx"):
            prefix = key.rpartition("/")[0]
            prefix = f"{prefix}/" if prefix else ""
            return S3Location(bucket, prefix, prefix + MANIFEST_NAME, key)
        if key.endswith(".json"):
            prefix = key.rpartition("/")[0]
            prefix = f"{prefix}/" if prefix else ""
            return S3Location(bucket, prefix, key, None)
        prefix = key if not key or key.endswith("/") else key + "/"
        return S3Location(bucket, prefix, prefix + MANIFEST_NAME, None)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ModelSourceError(f"model URI {uri!r}: file:// URIs must name a local path")
        return LocalLocation(Path(unquote(parts.path)))
    # One-letter "schemes" are Windows drive letters, not URIs.
    if scheme and len(scheme) > 1 and "://" in uri:
        raise ModelSourceError(
            f"unsupported model URI scheme {scheme!r} in {uri!r} (use s3:// or a local path)"
        )
    return LocalLocation(Path(uri))


def cache_subdir(cache_dir: Path, loc: S3Location) -> Path:
    """`cache_dir/s3/<bucket>/<readable prefix>-<hash>`: one folder per model location.

    The readable part helps an operator; the hash keeps two prefixes that sanitise alike apart.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", loc.prefix.strip("/"))[:64].strip("._") or "root"
    digest = hashlib.sha256(loc.prefix.encode()).hexdigest()[:10]
    return cache_dir.expanduser() / "s3" / loc.bucket / f"{readable}-{digest}"


# --------------------------------------------------------------------------- verification


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (multi-line library errors) and cap the length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise ModelSourceError(
            f"invalid manifest {where}: {loc}: {one_line(first['msg'], 160)} ({exc.error_count()} error(s))"
        ) from exc
    name = manifest.file
    # The manifest names a file beside it; anything else could escape the folder (or the cache).
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ModelSourceError(f"invalid manifest {where}: file {name!r} must be a plain file name")
    return manifest


def verify_onnx(onnx_path: Path, manifest: Manifest) -> None:
    """Raise ModelSourceError unless ONNX Runtime loads the file, its signature fits the manifest
    and a test inference returns one probability row per image."""
    # Imported here: `lungserve upload` and URI parsing must not pay for onnxruntime.
    import numpy as np
    import onnxruntime as ort

    from service.engine import validate_signature

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own stderr logging would duplicate our one-line error
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own pybind exception types
        raise ModelSourceError(f"not a loadable ONNX model: {onnx_path.name}: {one_line(exc, 200)}") from exc
    try:
        validate_signature(manifest, session.get_inputs(), session.get_outputs())
    except ModelSourceError as exc:
        raise ModelSourceError(f"manifest does not fit the model: {one_line(exc)}") from exc
    size = manifest.input_size
    batch = np.full((2, size, size, 3), 128, dtype=np.uint8)
    try:
        (out,) = session.run([manifest.output_name], {manifest.input_name: batch})
    except Exception as exc:
        raise ModelSourceError(f"model failed a test inference: {one_line(exc, 200)}") from exc
    probs = np.asarray(out)
    if probs.shape != (2, len(manifest.classes)):
        raise ModelSourceError(
            f"manifest does not fit the model: output shape {list(probs.shape)} for a batch of 2, "
            f"expected [2, {len(manifest.classes)}] ({len(manifest.classes)} classes)"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(np.abs(probs.sum(axis=1) - 1) > 1e-3):
        raise ModelSourceError("manifest does not fit the model: its output rows are not probabilities")


# --------------------------------------------------------------------------- local


def load_local_model(path: Path) -> ModelArtifact:
    """A folder with model.json + the file it names, a `.onnx` with model.json beside it, or the
    model.json itself. Checksum and ONNX verified; raises ModelSourceError."""
    path = path.expanduser()
    model_path: Path | None = None
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
    elif path.suffix == ".json":
        manifest_path = path
    elif path.is_file():
        manifest_path, model_path = path.parent / MANIFEST_NAME, path
    else:
        raise ModelSourceError(f"model path not found: {path}")
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ModelSourceError(f"manifest not found: {manifest_path}") from None
    except OSError as exc:
        raise ModelSourceError(f"cannot read manifest {manifest_path}: {one_line(exc)}") from exc
    manifest = parse_manifest(data, str(manifest_path))
    if model_path is None:
        model_path = manifest_path.parent / manifest.file
    elif model_path.name != manifest.file:
        raise ModelSourceError(
            f"manifest {manifest_path} describes {manifest.file!r}, not {model_path.name!r}"
        )
    if not model_path.is_file():
        raise ModelSourceError(f"model file not found: {model_path} (named by {manifest_path})")
    digest = sha256_file(model_path)
    if digest != manifest.sha256:
        raise ModelSourceError(
            f"checksum mismatch: {model_path} has sha256 {digest}, its manifest says {manifest.sha256}"
        )
    verify_onnx(model_path, manifest)
    return ModelArtifact(onnx_path=model_path, manifest=manifest, source=str(path))


# --------------------------------------------------------------------------- S3


def s3_client_config(
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> AioConfig:
    """botocore retries transient errors itself ("standard": connection errors, 5xx, throttling,
    exponential backoff with jitter); we add no retry loop of our own."""
    return AioConfig(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # `total_max_attempts` counts the first try; botocore's `max_attempts` key would count retries only.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        user_agent_extra=f"lungserve/{__version__}",
        # The model's sha256 is verified end to end; the SDK's extra CRC trailers only break
        # older MinIO / Ceph gateways, so send and check them only where the API requires it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
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
            f"S3 endpoint {where} unreachable after {max_attempts} attempt(s) {verb} {what} {uri}: "
            f"{one_line(exc, 160)}"
        )
    if isinstance(exc, HTTPClientError):  # connection closed / reset mid-response
        return ModelSourceError(f"transfer of {what} {uri} ({where}) was interrupted: {one_line(exc, 160)}")
    if isinstance(exc, BotoCoreError):
        return ModelSourceError(f"S3 request for {what} {uri} ({where}) failed: {one_line(exc, 160)}")
    return ModelSourceError(
        f"{verb} {what} {uri} ({where}) failed: {type(exc).__name__}: {one_line(exc, 160)}"
    )


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
        digest = hasher.hexdigest()
        if digest != sha256:
            raise ModelSourceError(
                f"checksum mismatch: s3://{bucket}/{key} has sha256 {digest}, the manifest says {sha256}"
            )
        os.replace(tmp, dest)
        return size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _prune_cache(folder: Path, keep_sha: str, *, stale_part_s: float = 24 * 3600) -> None:
    """Keep the current model and the most recently used other one (a quick roll-back); drop older
    ones and temporary files left by a crash. Best effort: the cache is an optimisation."""
    try:
        models = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        others = [p for p in models if p.stem != keep_sha]
        for old in others[1:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        now = time.time()
        for part in folder.glob(".*.part"):
            if now - part.stat().st_mtime > stale_part_s:
                part.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not prune model cache %s: %s", folder, exc)


async def _read_manifest(
    s3: S3Client, loc: S3Location, *, endpoint_url: str | None, max_attempts: int
) -> tuple[bytes, str | None, str | None]:
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
            exc, uri=uri, what="manifest", endpoint_url=endpoint_url, max_attempts=max_attempts
        ) from exc
    etag = response.get("ETag")
    return data, etag.strip('"') if etag else None, response.get("VersionId")


async def _fetch_s3(
    loc: S3Location,
    *,
    uri: str,
    cache_dir: Path,
    endpoint_url: str | None,
    region: str | None,
    config: AioConfig,
    max_attempts: int,
    session: aioboto3.Session,
) -> ModelArtifact:
    async with session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config) as s3:
        data, etag, version_id = await _read_manifest(
            s3, loc, endpoint_url=endpoint_url, max_attempts=max_attempts
        )
        manifest = parse_manifest(data, loc.uri(loc.manifest_key))
        model_key = loc.model_key or loc.prefix + manifest.file
        if model_key.rpartition("/")[2] != manifest.file:
            raise ModelSourceError(
                f"manifest {loc.uri(loc.manifest_key)} describes {manifest.file!r}, not {loc.uri(model_key)}"
            )
        folder = cache_subdir(cache_dir, loc)
        folder.mkdir(parents=True, exist_ok=True)
        cached = folder / f"{manifest.sha256}.onnx"
        downloaded = 0
        # The file name is only a hint: a cache file counts only if its content still hashes right.
        if cached.is_file() and await asyncio.to_thread(sha256_file, cached) == manifest.sha256:
            log.info("model %s %s: verified cache hit, nothing to download", manifest.name, manifest.version)
            os.utime(cached)  # "recently used" for pruning
        else:
            log.info("downloading model %s %s from %s", manifest.name, manifest.version, loc.uri(model_key))
            try:
                downloaded = await download_object(s3, loc.bucket, model_key, cached, sha256=manifest.sha256)
            except (ClientError, BotoCoreError) as exc:
                raise describe_s3_error(
                    exc, uri=loc.uri(model_key), what="model", endpoint_url=endpoint_url,
                    max_attempts=max_attempts,
                ) from exc
        await asyncio.to_thread(_atomic_write, cached.with_suffix(".json"), data)
    await asyncio.to_thread(verify_onnx, cached, manifest)
    await asyncio.to_thread(_prune_cache, folder, manifest.sha256)
    return ModelArtifact(
        onnx_path=cached,
        manifest=manifest,
        source=uri,
        etag=etag,
        version_id=version_id,
        downloaded_bytes=downloaded,
    )


async def fetch_model(
    uri: str,
    *,
    cache_dir: Path,
    endpoint_url: str | None = None,
    region: str | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    session: aioboto3.Session | None = None,
) -> ModelArtifact:
    """Fetch (or find in the cache), verify and return the model at `uri`.

    `endpoint_url` is for S3-compatible stores (MinIO, Ceph, moto); `region` is passed to the
    client (None: the chain's region, e.g. AWS_REGION / AWS_DEFAULT_REGION / the profile).
    `session` lets a caller supply its own aioboto3 session (e.g. one with botocore event hooks);
    by default a fresh `aioboto3.Session()` resolves credentials through the standard chain.
    The whole operation, retries included, is bounded by `timeout_s`.
    Raises ModelSourceError with a one-line cause; never returns an unverified model.
    """
    loc = parse_model_uri(uri)
    timeout = asyncio.timeout(timeout_s)
    try:
        async with timeout:
            if isinstance(loc, LocalLocation):
                return await asyncio.to_thread(load_local_model, loc.path)
            return await _fetch_s3(
                loc,
                uri=uri,
                cache_dir=cache_dir,
                endpoint_url=endpoint_url,
                region=region,
                config=s3_client_config(
                    connect_timeout_s=connect_timeout_s,
                    read_timeout_s=read_timeout_s,
                    max_attempts=max_attempts,
                ),
                max_attempts=max_attempts,
                session=session or aioboto3.Session(),
            )
    except TimeoutError:
        if timeout.expired():
            raise ModelSourceError(
                f"fetching the model from {uri} did not finish within {timeout_s:g} s "
                f"(endpoint {endpoint_url or 'AWS S3'})"
            ) from None
        raise


async def fetch_configured_model(settings: Settings) -> ModelArtifact:
    """`fetch_model` with the service's settings: the one call start-up and reload share."""
    return await fetch_model(
        settings.model_uri,
        cache_dir=settings.model_cache_dir,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        max_attempts=settings.s3_max_attempts,
        timeout_s=settings.model_fetch_timeout_s,
    )


async def current_etag(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    session: aioboto3.Session | None = None,
) -> str | None:
    """The ETag of the manifest `uri` resolves to (HEAD, no body), for cheap reload polling.

    None for local models. `lungserve upload` writes the manifest last, so a new ETag means a
    complete new model. Raises ModelSourceError like `fetch_model`.
    """
    loc = parse_model_uri(uri)
    if isinstance(loc, LocalLocation):
        return None
    config = s3_client_config(
        connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s, max_attempts=max_attempts
    )
    session = session or aioboto3.Session()
    async with session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config) as s3:
        try:
            head = await s3.head_object(Bucket=loc.bucket, Key=loc.manifest_key)
        except (ClientError, BotoCoreError) as exc:
            error = describe_s3_error(
                exc, uri=loc.uri(loc.manifest_key), what="manifest", endpoint_url=endpoint_url,
                max_attempts=max_attempts,
            )
            if isinstance(exc, ClientError) and "not found" in str(error):
                # HEAD answers carry no error code: tell a missing bucket from a missing key.
                with contextlib.suppress(ClientError, BotoCoreError):
                    await s3.head_bucket(Bucket=loc.bucket)
                    raise error from exc
                raise ModelSourceError(
                    f"bucket {loc.bucket!r} does not exist or is not readable ({endpoint_url or 'AWS S3'})"
                ) from exc
            raise error from exc
    etag = head.get("ETag")
    return etag.strip('"') if etag else None
