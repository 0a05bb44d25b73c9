"""`create_app(settings)`: the FastAPI application and its lifespan.

Start-up (lifespan): decode pool -> fetch the model (sha256 checked) -> ORT engine + warm-up
of every batch shape (the model's verification) -> batcher.start() -> ready. Shut-down: not ready -> batcher.stop()
(drains what was admitted) -> decode pool shut down. All state lives on `app.state.service`
(a `ServiceState`); nothing is global, so several apps can live in one process (tests).

Every error leaves through one JSON shape, `{"error": {"code", "message", "request_id"?}}`:
domain errors via `service.errors.http_error`, and FastAPI's validation errors, Starlette's
404/405 and unexpected exceptions are converted to domain errors first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

import service
from service.core.admission import UploadGate
from service.core.batcher import BatchObserver
from service.core.decode_pool import Decoder
from service.core.engine import Engine
from service.core.memory import Trimmer
from service.core.reload import ModelReloader
from service.core.runtime import ModelRuntime, Phase, ServiceState
from service.errors import LungserveError, ModelSourceError, http_error
from service.http import admin, analyze, explain, webpage
from service.http import jobs as jobs_door
from service.http import predict as api
from service.http.access import ApiKeys, api_key_guard
from service.http.admin import AuthFailures
from service.http.docs import install_docs
from service.http.middleware import AdminPortSplit, CloseUnreadBody
from service.http.uploads import RouteLimits
from service.jobs.runner import JobRunner
from service.jobs.store import open_store
from service.model.source import ModelArtifact, S3Options, fetch_configured_model
from service.observability.logs import RequestContextMiddleware, request_context_from_scope
from service.observability.metrics import Metrics, PredictionMetrics
from service.oip import rest as oip_door
from service.settings import Settings

if TYPE_CHECKING:
    from service.oip.grpc import GrpcDoor

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


async def build_runtime(
    artifact: ModelArtifact, settings: Settings, observer: BatchObserver | None = None
) -> ModelRuntime:
    """Engine -> warm-up of every batch size the batcher can form -> started batcher.

    Start-up and hot reload (`service.core.reload`) both build their runtime with this.
    """
    # Session creation and warm-up are seconds of CPU/GPU work: keep the loop (and
    # /health/live) responsive meanwhile.
    engine = await asyncio.to_thread(
        Engine,
        artifact.onnx_path,
        artifact.manifest,
        provider=settings.provider,
        intra_op_threads=settings.ort_intra_op_threads,
        inter_op_threads=settings.ort_inter_op_threads,
    )
    await asyncio.to_thread(engine.warm_up, range(1, settings.max_batch_size + 1))
    runtime = ModelRuntime(engine, settings, identity=artifact.identity, observer=observer)
    await runtime.start()
    return runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    # Each app its own registry: several apps (tests) in one process never share a counter.
    metrics = Metrics(CollectorRegistry(), settings.max_batch_size)
    state = ServiceState(settings=settings, observer=PredictionMetrics(metrics))
    # POST /admin/reload and the optional ETag poller: new model built beside the old, then swapped.
    # Each runtime's batcher gets its own observer: while the old one drains, the queue gauges
    # show the sum of both.
    reloader = ModelReloader(
        state,
        settings,
        lambda artifact: build_runtime(artifact, settings, metrics.batcher_observer()),
        on_swap=lambda runtime: metrics.set_model(runtime.identity, runtime.engine.provider),
    )

    # Optional API keys, for the HTTP doors and the gRPC one alike.
    keys = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file is not None else None
    grpc_door = _grpc_door(state, metrics, keys) if settings.grpc_port is not None else None
    # Slide jobs: state and results in LUNGSERVE_JOBS_URI; their tasks live in the lifespan.
    jobs = JobRunner(state, open_store(settings.jobs_uri, S3Options.from_settings(settings)), metrics.jobs)
    shutdown = Shutdown(state, metrics, reloader, grpc_door, jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decoder = Decoder(
            settings.preprocess_workers,
            max_image_pixels=settings.max_image_pixels,
            large_image_pixels=settings.large_image_pixels,
        )
        trimmer = Trimmer()
        trimming = asyncio.ensure_future(trimmer.run())
        gate = state.upload_gate = UploadGate(
            settings.max_uploads_in_flight, settings.max_body_bytes_in_flight, settings.retry_after_s, trimmer
        )
        metrics.watch_uploads(lambda: gate.uploads, lambda: gate.body_bytes)
        try:
            try:
                artifact = await fetch_configured_model(settings)
                identity = artifact.identity
                log.info(
                    "model fetched and verified (sha256)",
                    extra={**identity.log_fields(), "downloaded_bytes": artifact.downloaded_bytes},
                )
                warm_up_started = time.perf_counter()
                state.replace_runtime(await build_runtime(artifact, settings, metrics.batcher_observer()))
            except ModelSourceError as exc:
                # The one line an operator needs; the server then exits non-zero (start-up failed).
                log.error("model not loaded from %s: %s", settings.model_uri, exc)
                # That line is the diagnosis: spare the operator botocore's chained tracebacks.
                raise ModelSourceError(str(exc)) from None
            state.phase = Phase.READY
            serving = state.current()
            metrics.set_model(identity, serving.engine.provider)
            metrics.set_ready(True)
            log.info(
                "ready: model %s %s on %s, batches of up to %d",
                identity.name,
                identity.version,
                serving.engine.provider,
                settings.max_batch_size,
                extra={
                    **identity.log_fields(),
                    "provider": serving.engine.provider,
                    "max_batch_size": settings.max_batch_size,
                    "load_and_warm_up_s": round(time.perf_counter() - warm_up_started, 3),
                },
            )
            reloader.start_polling()
            await jobs.start()
            if grpc_door is not None and settings.grpc_port is not None:
                port = await grpc_door.start(settings.host, settings.grpc_port)
                log.info("Open Inference Protocol over gRPC on %s:%d", settings.host, port, extra={"grpc_port": port})
            yield
        finally:
            await shutdown.drain()  # usually already done by `lungserve serve` (service.http.server)
            state.decoder.shutdown()
            trimming.cancel()
            await asyncio.gather(trimming, return_exceptions=True)
            log.info("stopped")

    # API keys: an app-wide dependency, so it runs after routing (the request keeps its route
    # label) and before any handler reads a body or takes a queue slot.
    guards = [Depends(api_key_guard(keys, metrics.api_key_request))] if keys is not None else []
    app = FastAPI(
        title="lungserve",
        version=service.__version__,
        summary="Lung histopathology classification (LC25000 classes), micro-batched on ONNX Runtime.",
        lifespan=lifespan,
        dependencies=guards,
        # /openapi.json, /docs and /redoc come from service.http.docs: FastAPI's default pages need a CDN.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    app.state.reloader = reloader
    app.state.metrics = metrics
    app.state.upload_limits = RouteLimits.from_settings(settings)
    app.state.shutdown = shutdown
    app.state.jobs = jobs
    app.state.shed_at_headers = lambda method, path: _shed(state, metrics, method, path)
    app.state.admin_auth_failures = AuthFailures(settings.admin_auth_failures_per_minute)
    # Request id, X-Request-ID / Server-Timing headers, request metrics, one access line each.
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        quiet_routes=frozenset({"/metrics", "/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"}),
    )
    # An early answer to an unread body closes the connection; the admin port split.
    app.add_middleware(CloseUnreadBody)
    if settings.admin_port is not None:
        app.add_middleware(AdminPortSplit, admin_port=settings.admin_port)
    if settings.cors_origins:
        # Outermost: preflights are answered here, and every answer (401s too) gets its headers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID", oip_door.BINARY_HEADER],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing", oip_door.BINARY_HEADER],
            max_age=600,
        )
    app.include_router(api.router)
    app.include_router(oip_door.router)
    app.include_router(explain.router)
    app.include_router(analyze.router)
    app.include_router(jobs_door.router)
    app.include_router(admin.router)
    install_docs(app, api_keys=keys is not None)
    webpage.install(app)  # GET / and /page/*
    _install_error_handlers(app)
    return app


def _shed(state: ServiceState, metrics: Metrics, method: bytes, path: bytes) -> bool:
    """True when a POST to a door (anything but /admin) would only get 503 for a full queue:
    `lungserve serve` then answers it from the headers (service.http.server), the cheapest answer."""
    # A slide job (/jobs) waits for the queue later, queued: a full queue does not refuse it.
    if method != b"POST" or path.startswith((b"/admin", b"/jobs")) or state.phase is not Phase.READY:
        return False
    runtime = state.runtime
    if runtime is None or runtime.batcher.available > 0:
        return False
    metrics.rejected("queue_full")
    return True


def _grpc_door(state: ServiceState, metrics: Metrics, keys: ApiKeys | None) -> GrpcDoor:
    try:
        from service.oip.grpc import GrpcDoor
    except ImportError as exc:
        raise GrpcUnavailable(
            f"LUNGSERVE_GRPC_PORT needs the 'grpc' extra ({exc.name} is missing): pip install 'lungserve[grpc]'"
        ) from None
    return GrpcDoor(state, metrics, keys)


class GrpcUnavailable(Exception):
    """LUNGSERVE_GRPC_PORT is set but grpcio / tritonclient[grpc] are not installed."""


class Shutdown:
    """`service.http.server.ShutdownHooks` of this app: readiness off first, then the drain (once)."""

    def __init__(
        self,
        state: ServiceState,
        metrics: Metrics,
        reloader: ModelReloader,
        grpc_door: GrpcDoor | None = None,
        jobs: JobRunner | None = None,
    ) -> None:
        self._state = state
        self._jobs = jobs
        self._metrics = metrics
        self._reloader = reloader
        self._grpc_door = grpc_door
        self._drained: asyncio.Task[None] | None = None

    def draining(self) -> None:
        if self._state.phase is Phase.READY:
            self._state.phase = Phase.DRAINING
        self._metrics.set_ready(False)

    def drain(self) -> Awaitable[None]:
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        return asyncio.shield(self._drained)

    async def _drain(self) -> None:
        self.draining()
        self._state.phase = Phase.STOPPING
        settings = self._state.settings
        log.info("stopping: draining admitted requests", extra={"drain_timeout_s": settings.drain_timeout_s})
        if self._jobs is not None:
            await self._jobs.stop()  # first: running jobs checkpoint while the batcher still answers
        if self._grpc_door is not None:
            await self._grpc_door.stop(settings.drain_timeout_s)  # its calls in flight finish first
        await self._reloader.stop()  # no swap from now on; displaced models finish draining
        runtime = self._state.runtime
        if runtime is not None:
            await runtime.stop(settings.drain_timeout_s)


def _request_id(request: Request) -> str | None:
    ctx = request_context_from_scope(request.scope)
    return ctx.request_id if ctx is not None else None


def _json_error(request: Request, exc: LungserveError) -> JSONResponse:
    # OIP clients (tritonclient, KServe) read `{"error": "message"}`: every answer under /v2 has it.
    path = request.url.path.removeprefix(str(request.scope.get("root_path", "")).rstrip("/"))
    oip = path == oip_door.PREFIX or path.startswith(oip_door.PREFIX + "/")
    err = http_error(exc, _request_id(request), oip=oip)
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LungserveError)
        return _json_error(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        )
        error = LungserveError(f"invalid request: {problems}")
        error.code, error.status = "validation_error", 422
        return _json_error(request, error)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = LungserveError(str(exc.detail))
        error.code, error.status = _HTTP_CODES.get(exc.status_code, "http_error"), exc.status_code
        response = _json_error(request, error)
        for name, value in (exc.headers or {}).items():  # e.g. Allow on 405
            response.headers[name] = value
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware calls this and then re-raises, so the server
        # still logs the traceback; the client gets the usual JSON shape, without details.
        return _json_error(request, LungserveError("internal server error"))

    app.add_exception_handler(LungserveError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
