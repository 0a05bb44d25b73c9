"""A small Python client for lungserve's HTTP API, sync (`LungserveClient`) and async, on httpx.

Retries what the server refused with 503 or what never reached it, waiting at least
`Retry-After` with exponential backoff (classification is idempotent); per-file problems come
back as a `Prediction` with `error` set, whole-request failures raise `ClientError`. It talks to
the doors, never the core; `lungserve predict` is built on it. Usage: docs/clients.md.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self

import httpx

DEFAULT_URL: Final = "http://127.0.0.1:8000"

# What may be given as an image: a path, or (file name, encoded bytes).
ImageSource = str | Path | tuple[str, bytes]


class ClientError(Exception):
    """The server refused or failed a whole request (after any retries)."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Prediction:
    """One image's answer, or its own error (`error_code` set, `label` None)."""

    file: str | None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    decision: str | None = None  # "accept" | "refer", when the server makes decisions
    reason: str | None = None  # None | "low_confidence" | "out_of_distribution"
    model_name: str | None = None
    model_version: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def error(self) -> str | None:
        return None if self.error_code is None else f"{self.error_code}: {self.error_message}"

    @classmethod
    def from_json(cls, body: Mapping[str, Any], file: str | None = None) -> Prediction:
        """From a /predict answer or one /predict-many result."""
        name = file if file is not None else body.get("filename")
        if "error" in body:
            err = body["error"]
            return cls(file=name, error_code=str(err.get("code")), error_message=str(err.get("message")))
        model = body.get("model") or {}
        return cls(
            file=name,
            label=body["label"],
            confidence=float(body["confidence"]),
            probabilities={k: float(v) for k, v in body["probabilities"].items()},
            decision=body.get("decision"),
            reason=body.get("reason"),
            model_name=model.get("name"),
            model_version=model.get("version"),
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a request the server shed for load, or could not be reached."""

    max_attempts: int = 8
    base_delay_s: float = 0.25
    max_delay_s: float = 10.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before retry number `attempt` (1-based): at least Retry-After, else backoff.

        Exponential backoff with full jitter (so clients shed together do not return together),
        never below what the server asked for.
        """
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        jittered = random.uniform(backoff / 2, backoff)
        asked = _seconds(retry_after)
        return max(jittered, asked) if asked is not None else jittered


def _seconds(retry_after: str | None) -> float | None:
    # Retry-After may also be an HTTP date; lungserve sends seconds, other proxies may not.
    if retry_after is None:
        return None
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return None


def _retryable(response: httpx.Response) -> bool:
    # 503: overloaded (with Retry-After), still loading, or shutting down behind a load
    # balancer that will route the retry elsewhere. Nothing else is retried: a 4xx will not
    # change, and a 504 already spent the server's whole deadline on the request.
    return response.status_code == 503


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    raise ClientError(response.status_code, code, message)


def _read(source: ImageSource) -> tuple[str, bytes]:
    if isinstance(source, tuple):
        return source
    path = Path(source)
    return str(source), path.read_bytes()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _files(images: Sequence[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    # The server sniffs the format from the bytes; the part's content type is informative only.
    return [("files", (Path(name).name, data, "application/octet-stream")) for name, data in images]


OnRetry = Callable[[int, float, str], None]  # (attempt, delay_s, why)


class _Base:
    def __init__(self, retry: RetryPolicy | None, on_retry: OnRetry | None) -> None:
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.retries = 0  # total retries made by this client (for summaries and tests)

    def _next_delay(self, attempt: int, why: str, retry_after: str | None) -> float | None:
        """The wait before another try, or None when out of attempts."""
        if attempt >= self.retry.max_attempts:
            return None
        delay = self.retry.delay(attempt, retry_after)
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(attempt, delay, why)
        return delay

    @staticmethod
    def _many(response: httpx.Response, images: Sequence[tuple[str, bytes]]) -> list[Prediction]:
        _raise_for_error(response)
        results = response.json()["results"]
        # Results come back in upload order: name them with the caller's names (full paths).
        return [Prediction.from_json(r, name) for r, (name, _) in zip(results, images, strict=True)]


class LungserveClient(_Base):
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(retry, on_retry)
        self.http = http or httpx.Client(base_url=url, timeout=timeout_s, headers=_headers(api_key))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                delay = self._next_delay(attempt, type(exc).__name__, None)
                if delay is None:
                    raise ClientError(None, "unreachable", str(exc) or type(exc).__name__) from exc
            else:
                if not _retryable(response):
                    return response
                delay = self._next_delay(attempt, "overloaded", response.headers.get("retry-after"))
                if delay is None:
                    return response
            time.sleep(delay)

    def model_info(self) -> dict[str, Any]:
        """`GET /model`: manifest, provider, batching and upload limits."""
        response = self._send("GET", "/model")
        _raise_for_error(response)
        info: dict[str, Any] = response.json()
        return info

    def predict(self, image: ImageSource) -> Prediction:
        """`POST /predict`: one image. A bad image raises `ClientError` (its own 4xx)."""
        name, data = _read(image)
        response = self._send("POST", "/predict", files={"file": (Path(name).name, data, "application/octet-stream")})
        _raise_for_error(response)
        return Prediction.from_json(response.json(), name)

    def predict_many(self, images: Sequence[ImageSource]) -> list[Prediction]:
        """`POST /predict-many`: one request (at most the server's `max_files_per_request`)."""
        loaded = [_read(i) for i in images]
        return self._many(self._send("POST", "/predict-many", files=_files(loaded)), loaded)


class AsyncLungserveClient(_Base):
    """The same client for asyncio. Use `async with`, or call `aclose()`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(retry, on_retry)
        self.http = http or httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=_headers(api_key))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                delay = self._next_delay(attempt, type(exc).__name__, None)
                if delay is None:
                    raise ClientError(None, "unreachable", str(exc) or type(exc).__name__) from exc
            else:
                if not _retryable(response):
                    return response
                delay = self._next_delay(attempt, "overloaded", response.headers.get("retry-after"))
                if delay is None:
                    return response
            await asyncio.sleep(delay)

    async def model_info(self) -> dict[str, Any]:
        response = await self._send("GET", "/model")
        _raise_for_error(response)
        info: dict[str, Any] = response.json()
        return info

    async def predict(self, image: ImageSource) -> Prediction:
        name, data = await asyncio.to_thread(_read, image)
        response = await self._send(
            "POST", "/predict", files={"file": (Path(name).name, data, "application/octet-stream")}
        )
        _raise_for_error(response)
        return Prediction.from_json(response.json(), name)

    async def predict_many(self, images: Sequence[ImageSource]) -> list[Prediction]:
        loaded = await asyncio.to_thread(lambda: [_read(i) for i in images])
        return self._many(await self._send("POST", "/predict-many", files=_files(loaded)), loaded)
