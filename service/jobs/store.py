"""Where slide jobs live (`LUNGSERVE_JOBS_URI`): a local folder, or `s3://bucket/prefix` through aioboto3.

One layout in both, one folder (prefix) per job:

    <job id>/job.json            the record (service.pathology.jobs.Job)
    <job id>/source              the uploaded slide, until the job ends
    <job id>/tiles/000000.json   checkpoints: tile records, in chunks
    <job id>/thumb.png           the slide's picture so far (saved before each chunk)
    <job id>/result.json         /jobs/{id}/result, once done
    <job id>/classmap.png        /jobs/{id}/classmap.png, once done

Every write is whole or absent: a local file is written beside its target and renamed, an S3
object is one PUT (or a multipart upload that completes or is aborted). So a SIGTERM never
leaves half a checkpoint. S3 uses the model source's options and error messages
(`service.model.source.s3`), and is imported only for s3:// URIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from service.jobs.errors import JobStoreError as JobStoreError
from service.jobs.errors import SourceTooLarge as SourceTooLarge
from service.model.source.uri import S3Options


class JobStore(Protocol):
    """The operations the runner and the routes need; keys are relative ('<id>/job.json')."""

    async def put_bytes(self, key: str, data: bytes) -> None: ...
    async def get_bytes(self, key: str) -> bytes | None:
        """None when the key does not exist."""

    async def put_file(self, key: str, path: Path) -> None:
        """Store a (large) file without reading it into memory; `path` may be moved."""

    async def fetch_file(self, key: str, dest: Path) -> Path:
        """A local path holding the object: the stored file itself when local, else `dest`."""

    async def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    async def job_ids(self) -> list[str]: ...
    async def delete(self, key: str) -> None: ...


async def put_json(store: JobStore, key: str, document: Any) -> None:
    await store.put_bytes(key, json.dumps(document, separators=(",", ":")).encode())


async def get_json(store: JobStore, key: str) -> Any | None:
    data = await store.get_bytes(key)
    return None if data is None else json.loads(data)


def open_store(uri: str, s3: S3Options) -> JobStore:
    """A store for `uri`: `s3://bucket/prefix`, `file:///path` or a path. Nothing is touched yet."""
    parts = urlsplit(uri.strip())
    if parts.scheme.lower() == "s3":
        if not parts.netloc:
            raise ValueError(f"LUNGSERVE_JOBS_URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        from service.jobs.s3_store import S3JobStore

        return S3JobStore(parts.netloc, parts.path.strip("/"), s3)
    if parts.scheme.lower() == "file":
        return LocalJobStore(Path(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise ValueError(f"LUNGSERVE_JOBS_URI {uri!r}: expected a folder or s3://bucket/prefix")
    return LocalJobStore(Path(uri).expanduser())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # a checkpoint must survive the machine, not just the process
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LocalJobStore:
    """A folder; created on the first write, so a server that never runs a job leaves no trace."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    async def put_bytes(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(_atomic_write, self._path(key), data)
        except OSError as exc:
            raise JobStoreError(f"cannot write the job store {self.root}: {exc.strerror or exc}") from exc

    async def get_bytes(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JobStoreError(f"cannot read the job store {self.root}: {exc.strerror or exc}") from exc

    async def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)

        def move() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)  # a rename when the spool is on the same file system

        try:
            await asyncio.to_thread(move)
        except OSError as exc:
            raise JobStoreError(f"cannot write the job store {self.root}: {exc.strerror or exc}") from exc

    async def fetch_file(self, key: str, dest: Path) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise JobStoreError(f"the job's slide is missing from the job store ({key})")
        return path

    async def keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix)

        def walk() -> list[str]:
            if not folder.is_dir():
                return []
            return sorted(
                str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
            )

        return await asyncio.to_thread(walk)

    async def job_ids(self) -> list[str]:
        def scan() -> list[str]:
            if not self.root.is_dir():
                return []
            return sorted(p.name for p in self.root.iterdir() if (p / "job.json").is_file())

        return await asyncio.to_thread(scan)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._path(key).unlink)

    def spool_dir(self) -> Path:
        """Where uploads are spooled: inside the store, so `put_file` is a rename, not a copy."""
        folder = self.root / ".incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
