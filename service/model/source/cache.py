"""The on-disk cache of models fetched from S3: one folder per location, files named by sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from service.model.manifest import Manifest, sha256_file
from service.model.source.uri import S3Location

log = logging.getLogger(__name__)


def cache_subdir(cache_dir: Path, loc: S3Location) -> Path:
    """`cache_dir/s3/<bucket>/<readable prefix>-<hash>`: one folder per model location.

    The readable part helps an operator; the hash keeps two prefixes that sanitise alike apart.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", loc.prefix.strip("/"))[:64].strip("._") or "root"
    digest = hashlib.sha256(loc.prefix.encode()).hexdigest()[:10]
    return cache_dir.expanduser() / "s3" / loc.bucket / f"{readable}-{digest}"


def cached_model(folder: Path, manifest: Manifest) -> Path:
    """Where the model a manifest describes lives in `folder` (whether or not it is there yet)."""
    return folder / f"{manifest.sha256}.onnx"


def is_verified(path: Path, manifest: Manifest) -> bool:
    """A cache file counts only if its content still hashes right: the name is only a hint."""
    return path.is_file() and sha256_file(path) == manifest.sha256


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def prune(folder: Path, keep_sha: str, *, stale_part_s: float = 24 * 3600) -> None:
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
