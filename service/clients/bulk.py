"""`lungserve predict`: classify files and folders into a CSV or JSONL file, resumably.

Files are sent with `AsyncLungserveClient.predict_many` in chunks that fit the server's limits,
several requests at once; rows are appended as each chunk is answered, so a rerun skips files
that already have a successful row. `--local` serves the same app in this process (no socket),
through exactly the doors and core a server would (docs/clients.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from service.clients.http_client import AsyncLungserveClient, ClientError, Prediction, RetryPolicy

IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
# Multipart framing per file (boundary, headers): keeps a chunk under max_request_bytes.
PART_OVERHEAD_BYTES: Final = 512
# Whole-request answers that no retry or other chunk can fix: stop the run.
FATAL_STATUSES: Final = frozenset({401, 403, 404, 405})


class UsageError(Exception):
    """The run cannot start (bad output file, unreachable server, refused credentials)."""


# --- pure parts -------------------------------------------------------------------------------


def walk(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders recursively (image suffixes only), each file once, in order."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(child, None)
        elif path.exists():
            found.setdefault(path, None)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return list(found)


def chunked(sizes: Sequence[tuple[Path, int]], max_files: int, max_bytes: int) -> list[list[Path]]:
    """Consecutive groups of at most `max_files` files and (with framing) `max_bytes` bytes."""
    groups: list[list[Path]] = []
    current: list[Path] = []
    current_bytes = 0
    for path, size in sizes:
        cost = size + PART_OVERHEAD_BYTES
        if current and (len(current) >= max_files or current_bytes + cost > max_bytes):
            groups.append(current)
            current, current_bytes = [], 0
        current.append(path)
        current_bytes += cost
    if current:
        groups.append(current)
    return groups


def columns(classes: Sequence[str]) -> list[str]:
    return [
        "file",
        "label",
        "confidence",
        *(f"prob_{c}" for c in classes),
        "decision",
        "reason",
        "model_version",
        "error",
    ]


def to_row(prediction: Prediction, classes: Sequence[str]) -> dict[str, Any]:
    """One output row. JSONL keeps probabilities as an object; CSV flattens them (see `Output`)."""
    return {
        "file": prediction.file,
        "label": prediction.label,
        "confidence": prediction.confidence,
        "probabilities": {c: prediction.probabilities[c] for c in classes if c in prediction.probabilities},
        "decision": prediction.decision,
        "reason": prediction.reason,
        "model_version": prediction.model_version,
        "error": prediction.error,
    }


class Output:
    """The result file: CSV or JSONL by suffix, appended row by row, resumable."""

    def __init__(self, path: Path, classes: Sequence[str]) -> None:
        if path.suffix.lower() not in {".csv", ".jsonl"}:
            raise UsageError(f"--out must end in .csv or .jsonl, not {path.name!r}")
        self.path = path
        self.classes = list(classes)
        self.jsonl = path.suffix.lower() == ".jsonl"
        self.columns = columns(self.classes)

    def resume(self) -> set[str]:
        """Files that already have a successful row; rewrites the file keeping only those rows."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        # Done = a complete successful row; a row cut short by a crash mid-write is tried again.
        kept = [row for row in self._read() if not row.get("error") and row.get("label") and row.get("model_version")]
        # Atomic rewrite: an interruption leaves the old file or the new one, never half of one.
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, newline="") as tmp:
            self._write(tmp, kept, header=True)
        os.replace(tmp.name, self.path)
        return {str(row["file"]) for row in kept}

    def _read(self) -> list[dict[str, Any]]:
        with self.path.open(newline="") as f:
            if self.jsonl:
                return [row for line in f if (row := _json_row(line)) is not None]
            reader = csv.DictReader(f)
            if reader.fieldnames != self.columns:
                raise UsageError(
                    f"{self.path} has columns {reader.fieldnames}, but this model's are {self.columns}: "
                    "write to a new file"
                )
            return list(reader)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            self._write(f, rows, header=new)

    def _write(self, f: Any, rows: Iterable[dict[str, Any]], header: bool) -> None:
        if self.jsonl:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            return
        writer = csv.DictWriter(f, fieldnames=self.columns)
        if header:
            writer.writeheader()
        for row in rows:
            flat = {k: v for k, v in row.items() if k != "probabilities"}
            probabilities = row.get("probabilities")
            if isinstance(probabilities, dict):  # a row from to_row; rows read back are flat already
                flat.update({f"prob_{c}": probabilities.get(c) for c in self.classes})
            writer.writerow(flat)


def _json_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # blank, or cut short by an interrupted run
    return row if isinstance(row, dict) else None


@dataclass
class Summary:
    files: int = 0
    skipped: int = 0
    classified: int = 0
    failed: int = 0
    retries: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    def text(self, out: Path) -> str:
        rate = self.classified / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"{self.classified} classified, {self.failed} failed, {self.skipped} skipped (already in {out}) "
            f"of {self.files} files in {self.seconds:.1f} s ({rate:.1f} images/s); {self.retries} retries"
        )
        if self.errors:
            line += "\nerrors: " + ", ".join(f"{code} x{n}" for code, n in self.errors.most_common())
        return line


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    url: str = "http://127.0.0.1:8000"
    local: bool = False
    concurrency: int = 4
    api_key: str | None = None
    progress: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@contextlib.asynccontextmanager
async def _http(options: RunOptions) -> AsyncIterator[httpx.AsyncClient]:
    if not options.local:
        async with httpx.AsyncClient(base_url=options.url, timeout=300.0) as http:
            yield http
        return
    # The app in this process, started and stopped by its own lifespan: same doors, same core.
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings, describe_error

    try:
        settings = Settings()
    except ValidationError as exc:
        raise UsageError(f"invalid settings:\n{describe_error(exc)}") from None
    from service.http.access import ApiKeysFileError

    try:
        app = create_app(settings)
    except ApiKeysFileError as exc:
        raise UsageError(str(exc)) from None
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lungserve.local", timeout=300.0) as http:
            yield http


async def run(paths: Sequence[Path], out: Path, options: RunOptions) -> Summary:
    from tqdm import tqdm

    files = walk(paths)
    summary = Summary(files=len(files))
    started = time.perf_counter()
    async with _http(options) as http:
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else None
        if headers:
            http.headers.update(headers)
        client = AsyncLungserveClient(http=http, retry=options.retry)
        try:
            info = await client.model_info()
        except ClientError as exc:
            raise UsageError(f"cannot read the server's limits from /model: {exc}") from exc
        classes: list[str] = list(info["manifest"]["classes"])
        limits = info["limits"]
        output = Output(out, classes)
        done = output.resume()
        todo = [f for f in files if str(f) not in done]
        summary.skipped = len(files) - len(todo)

        sized, early = _sizes(todo, int(limits["max_file_bytes"]))
        groups = chunked(sized, int(limits["max_files_per_request"]), int(limits["max_request_bytes"]))
        # disable=None: tqdm shows the bar only on a terminal (a CI log gets the summary alone).
        bar = tqdm(total=len(todo), unit="img", disable=None if options.progress else True, dynamic_ncols=True)
        lock = asyncio.Lock()

        async def record(predictions: Sequence[Prediction]) -> None:
            async with lock:  # one writer at a time: rows never interleave
                output.append([to_row(p, classes) for p in predictions])
                for p in predictions:
                    if p.ok:
                        summary.classified += 1
                    else:
                        summary.failed += 1
                        summary.errors[p.error_code or "error"] += 1
                bar.update(len(predictions))
                bar.set_postfix(failed=summary.failed, retries=client.retries, refresh=False)

        await record(early)
        slots = asyncio.Semaphore(max(1, options.concurrency))

        async def one(chunk: list[Path]) -> None:
            async with slots:
                await record(await _classify(client, chunk))

        try:
            # A TaskGroup: a fatal answer (401, wrong URL) stops the other requests too.
            async with asyncio.TaskGroup() as tasks:
                for group in groups:
                    tasks.create_task(one(group))
        except* UsageError as fatal:
            raise fatal.exceptions[0] from None
        finally:
            bar.close()
            summary.retries = client.retries
            summary.seconds = time.perf_counter() - started
    return summary


def _sizes(files: Sequence[Path], max_file_bytes: int) -> tuple[list[tuple[Path, int]], list[Prediction]]:
    """Sizes of the files to send; files that cannot be sent get their error row at once."""
    sized: list[tuple[Path, int]] = []
    early: list[Prediction] = []
    for path in files:
        try:
            size = path.stat().st_size
        except OSError as exc:
            early.append(Prediction(file=str(path), error_code="unreadable", error_message=str(exc)))
            continue
        if size > max_file_bytes:
            early.append(
                Prediction(
                    file=str(path),
                    error_code="image_too_large",
                    error_message=f"{size} bytes, over the server's limit of {max_file_bytes}",
                )
            )
        else:
            sized.append((path, size))
    return sized, early


async def _classify(client: AsyncLungserveClient, group: list[Path]) -> list[Prediction]:
    try:
        return await client.predict_many(group)
    except ClientError as exc:
        if exc.status in FATAL_STATUSES:
            raise UsageError(f"the server refused the request: {exc}") from exc
        if exc.code == "request_too_large" and len(group) > 1:
            # Our size estimate was short (framing): halve the chunk rather than fail its files.
            half = len(group) // 2
            return [*await _classify(client, group[:half]), *await _classify(client, group[half:])]
        return [Prediction(file=str(p), error_code=exc.code, error_message=exc.message) for p in group]
    except OSError as exc:
        return [Prediction(file=str(p), error_code="unreadable", error_message=str(exc)) for p in group]
