"""Every Prometheus collector the service exposes, on the app's own registry.

`Metrics(registry, max_batch_size)` is built per app (each test counts into its own registry)
and is also the batcher's observer, structurally, so the batcher stays standard-library only.
`PredictionMetrics` is the runtime's `PredictionObserver`. Base units, `_total` counters and
low-cardinality labels only; one worker per device (docs/observability.md says why).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from service.errors import (
    ClientGone,
    DeadlineExceeded,
    ImageTooLarge,
    InferenceFailed,
    InvalidImage,
    LungserveError,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
)
from service.model.decision import ACCEPT, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Decision
from service.observability.histograms import observe_all
from service.observability.job_metrics import JobMetrics
from service.observability.logs import current_request

if TYPE_CHECKING:  # the runtime imports ONNX Runtime; only its types are needed here
    from service.core.batcher import BatchInfo
    from service.core.model_client import Classified
    from service.model.source import ModelIdentity

PREFIX: Final = "lungserve"

ImageOutcome = Literal["ok", "invalid", "too_large", "rejected", "error"]
"""What became of one uploaded image (label `outcome` of `lungserve_images_total`), as the
API reports it: ok: classified; invalid: not a decodable image; too_large: over the byte or
pixel limit; rejected: refused before compute (queue full, deadline, shutting down);
error: its batch's model run failed.

The sixth outcome, "cancelled": the image's request was cancelled before its answer (the
client went away, or the request deadline passed while it was decoding, queued or computing);
counted by `PredictionMetrics.on_image_abandoned`. Every admitted image ends in exactly one
outcome.
"""
IMAGE_OUTCOMES: Final[tuple[str, ...]] = (*get_args(ImageOutcome), "cancelled")
PROCESS_ROLES: Final = ("front", "model")  # the children the supervisor restarts

RejectReason = Literal["queue_full", "deadline", "bad_input", "shutting_down", "not_ready"]
"""Why a request was refused (label `reason` of `lungserve_rejected_total`)."""
REJECT_REASONS: Final[tuple[str, ...]] = get_args(RejectReason)

# `reason` label of lungserve_decisions_total for an accepted image (a label cannot be null).
NO_REASON: Final = "none"
DECISION_LABELS: Final[tuple[tuple[str, str], ...]] = tuple(
    (d.decision, d.reason or NO_REASON) for d in (ACCEPT, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION)
)

# Latency buckets for ms-scale work: decode and queue waits are usually 0.5-50 ms, a CPU
# batch of 32 tiles can take a second, a whole request under overload several seconds.
QUEUE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DECODE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SHA256_PREFIX_LEN: Final = 12


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... below `max_batch_size`, then `max_batch_size` itself (so a full batch
    lands exactly in the last finite bucket and "how often are batches full" is one query)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets: list[float] = []
    b = 1
    while b < max_batch_size:
        buckets.append(float(b))
        b *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


def status_class(status: int) -> str:
    """200 -> "2xx". Anything outside 100-599 is reported as "5xx" (a server bug)."""
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "5xx"


class Metrics:
    """The service's collectors, plus the calls the API, the app and the batcher make."""

    def __init__(self, registry: CollectorRegistry, max_batch_size: int, process: str = "server") -> None:
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.process = process  # "server" (one process), "front N" or "model" (docs/topology.md)
        r = registry
        # Several processes (docs/topology.md): the supervisor gives every child the same
        # PROMETHEUS_MULTIPROC_DIR, prometheus_client writes each value to a file there, and any
        # front's /metrics sums them (counters and histograms across every front and the model
        # process; gauges as stated per gauge below). Read here, not at import.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.jobs = JobMetrics(registry, PREFIX)  # slide jobs (service.jobs.runner)

        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by route template and status class.",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a request to the end of its response, by route template.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            f"{PREFIX}_images",
            "Uploaded images by outcome.",
            ["outcome"],
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time each image waited in the batcher's queue before its batch started.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            f"{PREFIX}_decode_seconds",
            "Time to decode and resize one image.",
            buckets=DECODE_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            f"{PREFIX}_inference_seconds",
            "Model run time per batch (successful or failed).",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per batch sent to the model.",
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.batch_failures = Counter(
            f"{PREFIX}_batch_failures",
            "Batches whose model run raised an error.",
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Images waiting in the batcher's queue.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batches_in_flight = Gauge(
            f"{PREFIX}_batches_in_flight",
            "Batches currently running in the model.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.uploads_in_flight = Gauge(
            f"{PREFIX}_uploads_in_flight",
            "Request bodies being received (upload slots taken).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.body_bytes_in_flight = Gauge(
            f"{PREFIX}_body_bytes_in_flight",
            "Request body bytes admitted and held in memory.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # The same, per process (label `process`: bounded by the fronts and the model process).
        # Live processes only: a replaced front's last values do not linger.
        self.process_queue_depth = Gauge(
            f"{PREFIX}_process_queue_depth",
            "Images waiting in this process's batcher queue.",
            ["process"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.process_batches_in_flight = Gauge(
            f"{PREFIX}_process_batches_in_flight",
            "Batches currently running in this process's model.",
            ["process"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.process_batch_size = Histogram(
            f"{PREFIX}_process_batch_size",
            "Images per batch sent to the model, by the process that ran it.",
            ["process"],
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.process_restarts = Counter(
            f"{PREFIX}_process_restarts",
            "Child processes the supervisor started again after they exited, by role (front, model).",
            ["role"],
            registry=r,
        )
        self.rejected_requests = Counter(
            f"{PREFIX}_rejected",
            "Requests refused before compute, by reason.",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter(
            f"{PREFIX}_predictions",
            "Predicted class of each classified image (watch for drift).",
            ["label"],
            registry=r,
        )
        self.decisions = Counter(
            f"{PREFIX}_decisions",
            "Refer decision of each classified image: accept, or refer with its reason (none when accepted).",
            ["decision", "reason"],
            registry=r,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The model being served: always 1, the information is in the labels.",
            ["name", "version", "sha256", "provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when a verified, warmed-up model is accepting requests.",
            registry=r,
            multiprocess_mode="livemin",  # several processes: 1 only when every front is ready
        )
        self.cancelled = Counter(
            f"{PREFIX}_cancelled",
            "Images dropped before compute because their client went away.",
            registry=r,
        )
        # Only with LUNGSERVE_API_KEYS_FILE: the key's *name* (bounded by the file), never the key.
        self.api_key_requests = Counter(
            f"{PREFIX}_api_key_requests",
            "Requests to key-protected routes by API key name (none: no or an unknown key) and outcome.",
            ["key", "outcome"],
            registry=r,
        )
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds... under their
        # standard names (no prefix) so stock dashboards work. Linux /proc; empty elsewhere.
        ProcessCollector(registry=r)

        self._model_labels: tuple[str, str, str, str] | None = None
        self._default_batcher = BatcherMetrics(self)
        # Pre-create the fixed label sets so a dashboard shows 0 rather than "no data" and
        # `rate()` sees the first increment.
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome=outcome)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason=reason)
        for d in DECISION_LABELS:
            self.decisions.labels(*d)
        for role in PROCESS_ROLES:
            self.process_restarts.labels(role=role)
        self.process_queue_depth.labels(process=process)
        self.process_batches_in_flight.labels(process=process)

    def restarted(self, role: str) -> None:
        """This process replaces one of `role` that exited (the supervisor said so: `--restart`)."""
        if role not in PROCESS_ROLES:
            raise ValueError(f"unknown process role {role!r}")
        self.process_restarts.labels(role=role).inc()

    # --- called by the request middleware and the API ---------------------------------

    def api_key_request(self, name: str | None, outcome: str) -> None:
        """outcome: ok | missing | invalid (service.http.access)."""
        self.api_key_requests.labels(key=name or "none", outcome=outcome).inc()

    def observe_request(self, route: str, status: int, duration_s: float) -> None:
        self.requests.labels(route=route, status=status_class(status)).inc()
        self.request_duration.labels(route=route).observe(duration_s)

    def observe_decode(self, seconds: float) -> None:
        self.decode.observe(seconds)

    def image_outcome(self, outcome: ImageOutcome, count: int = 1) -> None:
        if outcome not in get_args(ImageOutcome):  # a typo must not mint a new series
            raise ValueError(f"unknown image outcome {outcome!r}")
        self.images.labels(outcome=outcome).inc(count)

    def rejected(self, reason: RejectReason) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        self.rejected_requests.labels(reason=reason).inc()

    def prediction(self, label: str) -> None:
        """`label` is one of the served model's classes: bounded by the manifest."""
        self.predictions.labels(label=label).inc()

    def decision(self, decision: Decision) -> None:
        """One image's refer decision; the label sets are the three of DECISION_LABELS."""
        self.decisions.labels(decision=decision.decision, reason=decision.reason or NO_REASON).inc()

    def set_model(self, identity: ModelIdentity, provider: str) -> None:
        """Publish the served model; a previous model's label set is removed, so exactly
        one `lungserve_model_info` series is 1 at any time."""
        labels = (identity.name, identity.version, identity.sha256[:SHA256_PREFIX_LEN], provider)
        if self._model_labels is not None and self._model_labels != labels:
            # 0 first: with several processes remove() does not reach the shared files, where
            # the old label set would otherwise stay at 1 (docs/observability.md).
            self.model_info.labels(*self._model_labels).set(0)
            self.model_info.remove(*self._model_labels)
        self._model_labels = labels
        self.model_info.labels(*labels).set(1)

    def watch_uploads(self, uploads: Callable[[], float], body_bytes: Callable[[], float]) -> None:
        """Read the upload gate's counts at scrape time (in one process; with several, the app
        copies them into the shared files every second: `sample_uploads`)."""
        self._uploads = (uploads, body_bytes)
        if self.multiprocess_dir is None:
            self.uploads_in_flight.set_function(uploads)
            self.body_bytes_in_flight.set_function(body_bytes)

    _uploads: tuple[Callable[[], float], Callable[[], float]] | None = None

    def sample_uploads(self) -> None:
        if self._uploads is not None:
            uploads, body_bytes = self._uploads
            self.uploads_in_flight.set(uploads())
            self.body_bytes_in_flight.set(body_bytes())

    def set_ready(self, ready: bool) -> None:
        self.model_ready.set(1 if ready else 0)

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of a `GET /metrics` answer (Prometheus text format): this
        process's registry, or with several processes the sum over all of them, plus this
        process's own process_* series."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        ProcessCollector(registry=merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST

    # --- service.core.batcher.BatchObserver ------------------------------------------------

    def batcher_observer(self) -> BatcherMetrics:
        """An observer for one more batcher. During a hot reload the old model's batcher
        drains while the new one serves: each reports its own queue depth and in-flight
        batches, and the gauges must show the sum, not whichever reported last."""
        return BatcherMetrics(self)

    # `Metrics` itself is an observer too, for the common case of one batcher per app.

    def on_queue_depth(self, depth: int) -> None:
        self._default_batcher.on_queue_depth(depth)

    def on_batch_start(self, batch_id: int, size: int, queue_waits_s: Sequence[float]) -> None:
        self._default_batcher.on_batch_start(batch_id, size, queue_waits_s)

    def on_batch_end(self, batch_id: int, size: int, duration_s: float, error: BaseException | None) -> None:
        self._default_batcher.on_batch_end(batch_id, size, duration_s, error)

    def on_in_flight(self, batches: int) -> None:
        self._default_batcher.on_in_flight(batches)

    def on_dropped_cancelled(self, count: int) -> None:
        self._default_batcher.on_dropped_cancelled(count)


class BatcherMetrics:
    """`service.core.batcher.BatchObserver` for one batcher, counting into a shared `Metrics`.

    Counters and histograms simply add up. The two gauges are sums over batchers, so this
    keeps the batcher's last reported value and moves the gauge by the difference.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._depth = 0
        self._in_flight = 0
        # The children of this process's label, looked up once: the queue depth moves with
        # every image, and `labels()` costs more than the update itself.
        self._process_depth = metrics.process_queue_depth.labels(process=metrics.process)
        self._process_in_flight = metrics.process_batches_in_flight.labels(process=metrics.process)
        self._process_batch_size: Histogram | None = None  # its series appears with the first batch

    def on_queue_depth(self, depth: int) -> None:
        change = depth - self._depth
        if change:
            self.metrics.queue_depth.inc(change)
            self._process_depth.inc(change)
            self._depth = depth

    def on_batch_start(self, batch_id: int, size: int, queue_waits_s: Sequence[float]) -> None:
        m = self.metrics
        m.batch_size.observe(size)
        if self._process_batch_size is None:
            self._process_batch_size = m.process_batch_size.labels(process=m.process)
        self._process_batch_size.observe(size)
        observe_all(m.queue_wait, queue_waits_s)

    def on_batch_end(self, batch_id: int, size: int, duration_s: float, error: BaseException | None) -> None:
        self.metrics.inference.observe(duration_s)
        if error is not None:
            self.metrics.batch_failures.inc()

    def on_in_flight(self, batches: int) -> None:
        self.metrics.batches_in_flight.inc(batches - self._in_flight)
        self._process_in_flight.inc(batches - self._in_flight)
        self._in_flight = batches

    def on_dropped_cancelled(self, count: int) -> None:
        # images_total{outcome="cancelled"} is counted per request (`on_image_abandoned`), which
        # also sees images abandoned while decoding or computing; here only the queue's view.
        self.metrics.cancelled.inc(count)


def image_outcome_for(error: LungserveError) -> ImageOutcome | None:
    """The `images_total` outcome of an image that got `error` (None: counted elsewhere)."""
    if isinstance(error, ClientGone):
        return None  # dropped in the queue: the batcher observer counts it as "cancelled"
    if isinstance(error, ImageTooLarge):
        return "too_large"
    if isinstance(error, (Overloaded, DeadlineExceeded, ShuttingDown, ModelNotReady)):
        return "rejected"
    if isinstance(error, InferenceFailed) or error.status >= 500:
        return "error"
    return "invalid"  # InvalidImage and any other 4xx about this file


def reject_reason_for(error: LungserveError) -> RejectReason | None:
    """The `rejected_total` reason of a request refused as a whole with `error`.

    None when it is not a rejection: a problem with the one image of a /predict
    (`InvalidImage`, `ImageTooLarge`) is an image outcome, the client leaving is counted by
    `lungserve_cancelled_total`, and a failed model run is an `error` image.
    """
    if isinstance(error, Overloaded):
        return "queue_full"
    if isinstance(error, DeadlineExceeded):
        return "deadline"
    if isinstance(error, ShuttingDown):
        return "shutting_down"
    if isinstance(error, ModelNotReady):
        return "not_ready"
    if isinstance(error, (ClientGone, InvalidImage, ImageTooLarge)):
        return None
    if 400 <= error.status < 500:
        return "bad_input"  # the request itself: not multipart, missing field, too many files...
    return None


class PredictionMetrics:
    """The runtime's `PredictionObserver`: per-image statistics into `Metrics` and into the
    current request's `RequestContext` (Server-Timing, access log).

    One instance serves every request: per-request state comes from the request context
    variable, which the runtime's tasks inherit from the request handler.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_decoded(self, seconds: float) -> None:
        self.metrics.observe_decode(seconds)
        ctx = current_request()
        if ctx is not None:
            ctx.timing.add_decode(seconds)

    def on_classified(self, result: Classified, info: BatchInfo) -> None:
        self.metrics.image_outcome("ok")
        self.metrics.prediction(result.label)
        self.metrics.decision(result.decision)
        ctx = current_request()
        if ctx is not None:
            ctx.images += 1
            ctx.model_version = result.manifest.version
            ctx.timing.add_batch(info.batch_id, info.size, info.queue_wait_s, info.compute_s)

    def on_image_failed(self, error: LungserveError) -> None:
        outcome = image_outcome_for(error)
        if outcome is not None:
            self.metrics.image_outcome(outcome)
        ctx = current_request()
        if ctx is not None:
            ctx.images += 1

    def on_image_abandoned(self) -> None:
        self.metrics.images.labels(outcome="cancelled").inc()
        ctx = current_request()
        if ctx is not None:
            ctx.images += 1

    def on_rejected(self, error: LungserveError) -> None:
        reason = reject_reason_for(error)
        if reason is not None:
            self.metrics.rejected(reason)
        elif isinstance(error, (InvalidImage, ImageTooLarge)):
            # /predict's single image refused while it was read (e.g. over the byte limit):
            # count it where /predict-many's per-file errors go, not as a malformed request.
            self.on_image_failed(error)
