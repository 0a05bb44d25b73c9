"""`lungserve upload DIR s3://bucket/prefix/`: publish an exported model where the service fetches it.

Writes exactly the layout `service.model.source` reads (docs/model_contract.md), the model first
and the manifest last, so a server polling the manifest's ETag never sees a manifest whose model
is not there yet; the local sha256 is checked before anything is sent. Needs only aioboto3, so
it works in a serving-only install; `endpoint_url` targets MinIO, Ceph or moto.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import aioboto3
from botocore.exceptions import BotoCoreError, ClientError

from service.errors import ModelSourceError
from service.model.manifest import MANIFEST_NAME, parse_manifest, sha256_file
from service.model.source import S3Location, S3Options, parse_model_uri
from service.model.source.s3 import client, describe_s3_error

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)


def upload_location(uri: str) -> S3Location:
    """The S3 prefix an upload writes to; refuses anything but `s3://bucket[/prefix/]`."""
    loc = parse_model_uri(uri)
    if not isinstance(loc, S3Location) or loc.model_key is not None or uri.rstrip().endswith(".json"):
        raise ModelSourceError(f"upload needs an s3://bucket/prefix/ URI, got {uri!r}")
    return loc


async def upload(
    model_dir: Path,
    uri: str,
    *,
    s3: S3Options | None = None,
    create_bucket: bool = False,
    session: aioboto3.Session | None = None,
) -> list[str]:
    """Upload the model named by `model_dir/model.json`, then the manifest; return their URIs.

    Raises ModelSourceError (one line) when the folder is not a consistent model or S3 refuses.
    """
    loc = upload_location(uri)
    options = s3 or S3Options()
    manifest_path = model_dir / MANIFEST_NAME
    try:
        data = await asyncio.to_thread(manifest_path.read_bytes)
    except OSError as exc:
        raise ModelSourceError(f"cannot read manifest {manifest_path}: {exc.strerror or exc}") from exc
    manifest = parse_manifest(data, str(manifest_path))
    model_path = model_dir / manifest.file
    try:
        digest = await asyncio.to_thread(sha256_file, model_path)
    except OSError as exc:
        raise ModelSourceError(f"cannot read model {model_path}: {exc.strerror or exc}") from exc
    manifest.check_sha256(digest, str(model_path), hint="; re-export the model instead of editing either file")

    model_key = loc.prefix + manifest.file
    async with client(options, session) as s3_client:
        current = f"s3://{loc.bucket}"
        try:
            if create_bucket:
                await _ensure_bucket(s3_client, loc.bucket, options.region)
            current = loc.uri(model_key)
            log.info("uploading %s (%d bytes) to %s", model_path.name, model_path.stat().st_size, current)
            await s3_client.upload_file(
                str(model_path),
                loc.bucket,
                model_key,
                ExtraArgs={"ContentType": "application/octet-stream", "Metadata": {"sha256": manifest.sha256}},
            )
            # Last: publishing the manifest is what makes the new model visible to servers.
            current = loc.uri(loc.manifest_key)
            await s3_client.put_object(
                Bucket=loc.bucket, Key=loc.manifest_key, Body=data, ContentType="application/json"
            )
        except (ClientError, BotoCoreError) as exc:
            raise describe_s3_error(
                exc,
                uri=current,
                what="upload",
                endpoint_url=options.endpoint_url,
                max_attempts=options.max_attempts,
                writing=True,
            ) from exc
    return [loc.uri(model_key), loc.uri(loc.manifest_key)]


async def _ensure_bucket(s3: S3Client, bucket: str, region: str | None) -> None:
    """Create the bucket unless it exists already (for local MinIO / moto set-ups and demos)."""
    try:
        await s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
    log.info("creating bucket %s", bucket)
    if region and region != "us-east-1":
        # Outside us-east-1, S3 wants the region repeated as the location constraint.
        await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})  # type: ignore[typeddict-item]
    else:
        await s3.create_bucket(Bucket=bucket)
