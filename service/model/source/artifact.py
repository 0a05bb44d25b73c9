"""What a fetch returns: a model file that passed its checksum, and the identity it is served under."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.model.manifest import Manifest


@dataclass(frozen=True)
class ModelIdentity:
    """Which model, and where it came from: for `GET /model`, reload answers, logs and metrics."""

    name: str
    version: str
    sha256: str
    source: str | None = None
    """The URI it was fetched from (a local path for local models)."""
    etag: str | None = None
    """S3 ETag of the manifest object (what reload polling compares); None for local models."""
    version_id: str | None = None
    """S3 VersionId of the manifest object on a versioned bucket, else None."""

    @classmethod
    def of(
        cls, manifest: Manifest, source: str | None = None, etag: str | None = None, version_id: str | None = None
    ) -> ModelIdentity:
        return cls(manifest.name, manifest.version, manifest.sha256, source, etag, version_id)

    def as_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "source": self.source,
            "etag": self.etag,
            "version_id": self.version_id,
        }

    def log_fields(self) -> dict[str, str | None]:
        """Log `extra=` fields (`name` would clash with LogRecord.name)."""
        return {
            "model_name": self.name,
            "model_version": self.version,
            "sha256": self.sha256,
            "source": self.source,
            "etag": self.etag,
        }


@dataclass(frozen=True)
class ModelArtifact:
    """A model file on local disk whose sha256 matches its manifest, and where it came from.

    Whether ONNX Runtime can run it is checked once, by building the `Engine` from it.
    """

    onnx_path: Path
    manifest: Manifest
    identity: ModelIdentity
    downloaded_bytes: int = 0
    """Bytes of model fetched over the network: 0 for a local model or a verified cache hit."""
