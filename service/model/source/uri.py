"""Model URIs: a local path (or `file://`) or an S3 location, and how to reach S3."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from service.errors import ModelSourceError
from service.model.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from service.settings import Settings

DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
DEFAULT_READ_TIMEOUT_S: Final = 60.0
DEFAULT_MAX_ATTEMPTS: Final = 5
DEFAULT_TIMEOUT_S: Final = 300.0


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: one value for fetching, polling and uploading.

    `endpoint_url` is for S3-compatible stores (MinIO, Ceph, moto); `region` None means the
    AWS chain's region. botocore retries each request up to `max_attempts` times in all;
    `timeout_s` bounds a whole model fetch, retries included.
    """

    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Options:
        return cls(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            max_attempts=settings.s3_max_attempts,
            timeout_s=settings.model_fetch_timeout_s,
        )

    @property
    def where(self) -> str:
        """The endpoint, as error messages name it."""
        return self.endpoint_url or "AWS S3"


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
        raise ModelSourceError(f"unsupported model URI scheme {scheme!r} in {uri!r} (use s3:// or a local path)")
    return LocalLocation(Path(uri))


def parse_slide_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of a slide job's `s3://bucket/key`; ValueError for anything else. Here, not
    in service.jobs.s3_store: the routes check it without importing the AWS SDK."""
    parts = urlsplit(uri.strip())
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise ValueError("expected s3://bucket/key")
    key = parts.path.lstrip("/")
    if not key or key.endswith("/") or parts.query or parts.fragment:
        raise ValueError("expected s3://bucket/key naming one object (no query, no trailing slash)")
    return parts.netloc, key
