"""A model in a local folder, used in place."""

from __future__ import annotations

from pathlib import Path

from service.errors import ModelSourceError, one_line
from service.model.manifest import MANIFEST_NAME, parse_manifest, sha256_file
from service.model.source.artifact import ModelArtifact, ModelIdentity


def load_local_model(path: Path) -> ModelArtifact:
    """A folder with model.json + the file it names, a `.onnx` with model.json beside it, or the
    model.json itself. Checksum verified; raises ModelSourceError."""
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
        raise ModelSourceError(f"manifest {manifest_path} describes {manifest.file!r}, not {model_path.name!r}")
    if not model_path.is_file():
        raise ModelSourceError(f"model file not found: {model_path} (named by {manifest_path})")
    manifest.check_sha256(sha256_file(model_path), str(model_path))
    return ModelArtifact(model_path, manifest, ModelIdentity.of(manifest, source=str(path)))
