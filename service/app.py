"""`create_app(settings)`: the FastAPI application and its lifespan.

Start-up: decode pool -> model fetched (sha256 checked) -> engine + warm-up -> batcher -> ready;
shut-down in reverse, draining what was admitted. All state lives on `app.state.service` (a
`ServiceState`), nothing is global. Every error leaves as one JSON shape, built by
`service.http.errors` (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

import service
from service.core.admission import UploadGate
from service.core.decode_pool import Decoder
from service.core.memory import Trimmer
from service.core.queue_bound import QueueBound
from service.core.reload import ModelReloader, Reloader
from service.core.remote_client import RemoteModelClient
from service.core.remote_model import RemoteModel, RemoteReloader
from service.core.state import Phase, ServiceState
from service.errors import ModelSourceError
from service.http import admin, analyze, docs, explain, predict, status, webpage
from service.http import jobs as jobs_door
from service.http.access import KeyRing, KeysFile, api_key_guard
from service.http.admin import AuthFailures
from service.http.docs import declare_api_keys
from service.http.errors import install_error_handlers
from service.http.jobs_forward import JobsForwarder, JobsLink, JobsPlacement, TrustPrivateSocket
from service.http.middleware import AdminPortSplit, CloseUnreadBody, RequestContextMiddleware, SecurityHeaders
from service.http.uploads import RouteLimits
from service.jobs.runner import JobRunner
from service.jobs.store import open_store
from service.model.source import S3Options, fetch_configured_model
from service.observability.metrics import Metrics, PredictionMetrics
from service.observability.native_logs import silence_pillow_libtiff
from service.oip import rest as oip_door
from service.settings import Settings

if TYPE_CHECKING:
    from service.oip.grpc import GrpcDoor

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    remote: RemoteModel | None = None,
    queue_bound: QueueBound | None = None,
    jobs_placement: JobsPlacement | None = None,
    process: str = "server",
) -> FastAPI:
    """The whole app. `remote`: the model lives in the model process (a front of `lungserve
    serve` with LUNGSERVE_WORKERS > 1, docs/topology.md); else this process runs it, and
    `queue_bound` (a front with the model in it) makes its queue_limit the whole server's.
    `jobs_placement` (several fronts): front 0 runs the slide jobs, the others forward /jobs to
    it (service.http.jobs_forward); without it this process runs them. `process`: this
    process's name in the per-process metrics ("front N" under the supervisor)."""
    settings = settings if settings is not None else Settings()
    # Each app its own registry: several apps (tests) in one process never share a counter.
    metrics = Metrics(CollectorRegistry(), settings.max_batch_size, process)
    state = ServiceState(settings=settings, observer=PredictionMetrics(metrics))
    # POST /admin/reload and the optional ETag poller: new model built beside the old, then swapped.
    # Each runtime's batcher gets its own observer: while the old one drains, the queue gauges
    # show the sum of both.
    reloader: Reloader
    client: RemoteModelClient | None = None
    if remote is None:
        # Here, not at the top: a front whose model runs in the model process never loads
        # ONNX Runtime (tens of MiB per front).
        from service.core.runtime import open_runtime

        reloader = ModelReloader(
            state,
            settings,
            lambda artifact: open_runtime(artifact, settings, metrics.batcher_observer(), shared_bound=queue_bound),
            on_swap=lambda runtime: metrics.set_model(runtime.identity, runtime.provider),
        )
    else:
        client = RemoteModelClient(
            remote.socket_path,
            QueueBound(remote.queue_bound, remote.front, settings.queue_limit),
            front=remote.front,
            retry_after_s=settings.retry_after_s,
            on_model=lambda model: metrics.set_model(model.identity, model.provider),
        )
        reloader = RemoteReloader(client)

    # Optional API keys, for the HTTP doors and the gRPC one alike.
    keys = KeysFile(settings.api_keys_file) if settings.api_keys_file is not None else None
    grpc_door = _grpc_door(state, metrics, keys) if settings.grpc_port is not None else None
    # Slide jobs: state and results in LUNGSERVE_JOBS_URI; their tasks live in the lifespan.
    # With several fronts only front 0 runs them; the others pass /jobs on to it.
    jobs: JobRunner | None = None
    jobs_link: JobsLink | None = None
    if jobs_placement is None or jobs_placement.owner:
        jobs = JobRunner(state, open_store(settings.jobs_uri, S3Options.from_settings(settings)), metrics.jobs)
    else:
        jobs_link = JobsLink(jobs_placement.socket, retry_after_s=settings.retry_after_s, metrics=metrics.jobs)
    shutdown = Shutdown(state, metrics, reloader, grpc_door, jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        silence_pillow_libtiff()  # its prints would break the JSON log on every damaged TIFF
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
        sampling = asyncio.ensure_future(_sample_uploads(metrics)) if metrics.multiprocess_dir else None
        try:
            try:
                warm_up_started = time.perf_counter()
                if client is not None:
                    await client.start()  # connected to the model process, which is warm
                    state.replace_runtime(client)
                    identity = client.identity
                else:
                    artifact = await fetch_configured_model(settings)
                    identity = artifact.identity
                    log.info(
                        "model fetched and verified (sha256)",
                        extra={**identity.log_fields(), "downloaded_bytes": artifact.downloaded_bytes},
                    )
                    runtime = await open_runtime(
                        artifact, settings, metrics.batcher_observer(), shared_bound=queue_bound
                    )
                    state.replace_runtime(runtime)
            except ModelSourceError as exc:
                # The one line an operator needs; the server then exits non-zero (start-up failed).
                log.error("model not loaded from %s: %s", settings.model_uri, exc)
                # That line is the diagnosis: spare the operator botocore's chained tracebacks.
                raise ModelSourceError(str(exc)) from None
            state.phase = Phase.READY
            serving = state.current()
            metrics.set_model(identity, serving.provider)
            metrics.set_ready(True)
            log.info(
                "ready: model %s %s on %s, batches of up to %d",
                identity.name,
                identity.version,
                serving.provider,
                settings.max_batch_size,
                extra={
                    **identity.log_fields(),
                    "provider": serving.provider,
                    "max_batch_size": settings.max_batch_size,
                    "load_and_warm_up_s": round(time.perf_counter() - warm_up_started, 3),
                },
            )
            reloader.start_polling()
            if jobs is not None:
                await jobs.start()
            if grpc_door is not None and settings.grpc_port is not None:
                port = await grpc_door.start(settings.host, settings.grpc_port)
                log.info("Open Inference Protocol over gRPC on %s:%d", settings.host, port, extra={"grpc_port": port})
            yield
        finally:
            await shutdown.drain()  # usually already done by `lungserve serve` (service.http.server)
            state.decoder.shutdown()
            trimming.cancel()
            if sampling is not None:
                sampling.cancel()
            await asyncio.gather(trimming, *([sampling] if sampling else []), return_exceptions=True)
            if jobs_link is not None:
                await jobs_link.aclose()
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
    app.state.jobs = jobs  # None in a front that forwards /jobs: its jobs routes never run
    app.state.shed_at_headers = lambda method, path: _shed(state, metrics, method, path)
    app.state.admin_auth_failures = AuthFailures(settings.admin_auth_failures_per_minute)
    if jobs_link is not None:
        # Inside the request context: a forwarded request keeps its id, and is counted once.
        app.add_middleware(JobsForwarder, link=jobs_link)
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
    # Outermost of all: every answer, CORS preflights included, says nosniff, no framing, its CSP.
    app.add_middleware(SecurityHeaders)
    if jobs_placement is not None and jobs_placement.owner:
        # Front 0: what another front saw of a request it passed on (scheme, client) holds here.
        app.add_middleware(TrustPrivateSocket, socket_path=jobs_placement.socket)
    app.include_router(predict.router)
    app.include_router(status.router)
    app.include_router(oip_door.router)
    app.include_router(explain.router)
    app.include_router(analyze.router)
    app.include_router(jobs_door.router)
    app.include_router(admin.router)
    app.include_router(docs.router)
    app.include_router(webpage.router)  # GET / and /page/*
    if keys is not None:
        declare_api_keys(app)
    install_error_handlers(app)
    return app


async def _sample_uploads(metrics: Metrics) -> None:
    """Several processes: the upload gauges are copied to the shared files once a second (a
    callback gauge cannot be read from another process)."""
    while True:
        metrics.sample_uploads()
        await asyncio.sleep(1.0)


def _shed(state: ServiceState, metrics: Metrics, method: bytes, path: bytes) -> bool:
    """True when a POST to a door (anything but /admin) would only get 503 for a full queue:
    `lungserve serve` then answers it from the headers (service.http.server), the cheapest answer."""
    # A slide job (/jobs) waits for the queue later, queued: a full queue does not refuse it.
    if method != b"POST" or path.startswith((b"/admin", b"/jobs")) or state.phase is not Phase.READY:
        return False
    runtime = state.runtime
    if runtime is None or runtime.has_room():
        return False
    metrics.rejected("queue_full")
    return True


def _grpc_door(state: ServiceState, metrics: Metrics, keys: KeyRing | None) -> GrpcDoor:
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
        reloader: Reloader,
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
