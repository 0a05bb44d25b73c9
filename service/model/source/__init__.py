"""Where the model comes from: a local folder or an S3 prefix, checked against its sha256.

`fetch_model(uri, ...)` is the one entry point start-up and reload use; every returned
`ModelArtifact` has the sha256 its manifest promises, and every failure is a one-line
`ModelSourceError`. Part of the contract between `export/` and `service/`; the layout on disk,
in S3 and in the cache is in docs/model_contract.md. aioboto3 is imported only for s3:// URIs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ModelSourceError
from service.model.source.artifact import ModelArtifact, ModelIdentity
from service.model.source.local import load_local_model
from service.model.source.uri import LocalLocation, S3Location, S3Options, parse_model_uri

if TYPE_CHECKING:
    import aioboto3

    from service.settings import Settings

__all__ = [
    "LocalLocation",
    "ModelArtifact",
    "ModelIdentity",
    "S3Location",
    "S3Options",
    "current_etag",
    "fetch_configured_model",
    "fetch_model",
    "load_local_model",
    "parse_model_uri",
]


async def fetch_model(
    uri: str, *, cache_dir: Path, s3: S3Options | None = None, session: aioboto3.Session | None = None
) -> ModelArtifact:
    """Fetch (or find in the cache), check and return the model at `uri`.

    `session` lets a caller supply its own aioboto3 session (e.g. one with botocore event hooks);
    by default a fresh `aioboto3.Session()` resolves credentials through the standard chain.
    The whole operation, retries included, is bounded by `s3.timeout_s`.
    """
    options = s3 or S3Options()
    loc = parse_model_uri(uri)
    timeout = asyncio.timeout(options.timeout_s)
    try:
        async with timeout:
            if isinstance(loc, LocalLocation):
                return await asyncio.to_thread(load_local_model, loc.path)
            from service.model.source.s3 import fetch_s3

            return await fetch_s3(loc, uri=uri, cache_dir=cache_dir, options=options, session=session)
    except TimeoutError:
        if timeout.expired():
            raise ModelSourceError(
                f"fetching the model from {uri} did not finish within {options.timeout_s:g} s "
                f"(endpoint {options.where})"
            ) from None
        raise


async def fetch_configured_model(settings: Settings) -> ModelArtifact:
    """`fetch_model` with the service's settings: the one call start-up and reload share."""
    return await fetch_model(
        settings.model_uri, cache_dir=settings.model_cache_dir, s3=S3Options.from_settings(settings)
    )


async def current_etag(uri: str, *, s3: S3Options | None = None, session: aioboto3.Session | None = None) -> str | None:
    """The ETag of the manifest `uri` resolves to, for cheap reload polling; None for local models.

    `lungserve upload` writes the manifest last, so a new ETag means a complete new model.
    Raises ModelSourceError like `fetch_model`.
    """
    loc = parse_model_uri(uri)
    if isinstance(loc, LocalLocation):
        return None
    from service.model.source.s3 import manifest_etag

    return await manifest_etag(loc, s3 or S3Options(), session)
