"""Metrics: exact deltas on a fresh registry, exposition format, buckets, model relabel."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.core.batcher import Batcher, BatchInfo, BatchObserver
from service.core.model_client import Classified
from service.core.state import PredictionObserver
from service.errors import (
    ClientGone,
    DeadlineExceeded,
    ImageTooLarge,
    InferenceFailed,
    InvalidImage,
    LungserveError,
    MissingField,
    ModelNotReady,
    Overloaded,
    ShuttingDown,
    TooManyFiles,
)
from service.model.decision import ACCEPT
from service.model.manifest import Manifest
from service.model.preprocess import RESIZE
from service.model.source import ModelIdentity
from service.observability.logs import RequestContext, server_timing, use_request
from service.observability.metrics import (
    Metrics,
    PredictionMetrics,
    batch_size_buckets,
    image_outcome_for,
    reject_reason_for,
    status_class,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, max_batch_size=32)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_requests_are_counted_by_route_and_status_class(metrics: Metrics, registry: CollectorRegistry) -> None:
    # Binary fractions, so the histogram sum is exact.
    metrics.observe_request("/v1/predict", 200, 0.25)
    metrics.observe_request("/v1/predict", 201, 0.5)
    metrics.observe_request("/v1/predict", 422, 0.125)
    metrics.observe_request("/v1/predict", 503, 0.0625)
    metrics.observe_request("/health", 200, 0.001)

    assert value(registry, "lungserve_requests_total", route="/v1/predict", status="2xx") == 2
    assert value(registry, "lungserve_requests_total", route="/v1/predict", status="4xx") == 1
    assert value(registry, "lungserve_requests_total", route="/v1/predict", status="5xx") == 1
    assert value(registry, "lungserve_requests_total", route="/health", status="2xx") == 1
    assert value(registry, "lungserve_request_duration_seconds_count", route="/v1/predict") == 4
    assert value(registry, "lungserve_request_duration_seconds_sum", route="/v1/predict") == 0.9375
    assert value(registry, "lungserve_request_duration_seconds_bucket", route="/v1/predict", le="0.25") == 3


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (100, "1xx"),
        (200, "2xx"),
        (304, "3xx"),
        (404, "4xx"),
        (499, "4xx"),
        (500, "5xx"),
        (599, "5xx"),
        (0, "5xx"),
        (700, "5xx"),
    ],
)
def test_status_class(status: int, cls: str) -> None:
    assert status_class(status) == cls


def test_fixed_label_sets_start_at_zero(metrics: Metrics, registry: CollectorRegistry) -> None:
    for outcome in ("ok", "invalid", "too_large", "rejected", "error", "cancelled"):
        assert value(registry, "lungserve_images_total", outcome=outcome) == 0
    for reason in ("queue_full", "deadline", "bad_input", "shutting_down", "not_ready"):
        assert value(registry, "lungserve_rejected_total", reason=reason) == 0


def test_images_rejections_predictions_and_decode(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.image_outcome("ok")
    metrics.image_outcome("ok", count=3)
    metrics.image_outcome("invalid")
    metrics.image_outcome("too_large")
    metrics.rejected("queue_full")
    metrics.rejected("queue_full")
    metrics.rejected("deadline")
    metrics.prediction("lung_aca")
    metrics.prediction("lung_aca")
    metrics.prediction("lung_n")
    metrics.observe_decode(0.004)
    metrics.observe_decode(0.03)

    assert value(registry, "lungserve_images_total", outcome="ok") == 4
    assert value(registry, "lungserve_images_total", outcome="invalid") == 1
    assert value(registry, "lungserve_images_total", outcome="too_large") == 1
    assert value(registry, "lungserve_images_total", outcome="error") == 0
    assert value(registry, "lungserve_rejected_total", reason="queue_full") == 2
    assert value(registry, "lungserve_rejected_total", reason="deadline") == 1
    assert value(registry, "lungserve_rejected_total", reason="bad_input") == 0
    assert value(registry, "lungserve_predictions_total", label="lung_aca") == 2
    assert value(registry, "lungserve_predictions_total", label="lung_n") == 1
    assert value(registry, "lungserve_predictions_total", label="lung_scc") is None
    assert value(registry, "lungserve_decode_seconds_count") == 2
    assert value(registry, "lungserve_decode_seconds_bucket", le="0.005") == 1


def test_unknown_outcome_or_reason_is_refused_not_minted(metrics: Metrics, registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="outcome"):
        metrics.image_outcome("patient_1234.jpeg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reason"):
        metrics.rejected("because")  # type: ignore[arg-type]
    # "cancelled" has its own hook (on_image_abandoned), never a plain outcome call.
    with pytest.raises(ValueError, match="outcome"):
        metrics.image_outcome("cancelled")  # type: ignore[arg-type]
    assert value(registry, "lungserve_images_total", outcome="patient_1234.jpeg") is None


def test_batch_observer_calls(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.on_queue_depth(7)
    metrics.on_in_flight(1)
    metrics.on_batch_start(1, 3, [0.001, 0.002, 0.02])
    metrics.on_batch_end(1, 3, 0.015, None)
    metrics.on_batch_start(2, 32, [0.0] * 32)
    metrics.on_batch_end(2, 32, 0.25, RuntimeError("ORT failed"))
    metrics.on_queue_depth(0)
    metrics.on_in_flight(0)
    metrics.on_dropped_cancelled(2)

    assert value(registry, "lungserve_batch_size_count") == 2
    assert value(registry, "lungserve_batch_size_sum") == 35
    assert value(registry, "lungserve_batch_size_bucket", le="4.0") == 1
    assert value(registry, "lungserve_batch_size_bucket", le="16.0") == 1
    assert value(registry, "lungserve_batch_size_bucket", le="32.0") == 2
    assert value(registry, "lungserve_queue_wait_seconds_count") == 35
    assert value(registry, "lungserve_queue_wait_seconds_bucket", le="0.0025") == 34
    assert value(registry, "lungserve_inference_seconds_count") == 2
    assert value(registry, "lungserve_inference_seconds_sum") == 0.265
    assert value(registry, "lungserve_batch_failures_total") == 1
    assert value(registry, "lungserve_queue_depth") == 0
    assert value(registry, "lungserve_batches_in_flight") == 0
    assert value(registry, "lungserve_cancelled_total") == 2
    # The image outcome is counted per request (on_image_abandoned), never twice.
    assert value(registry, "lungserve_images_total", outcome="cancelled") == 0


def test_gauges_follow_the_last_value(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.on_queue_depth(12)
    metrics.on_in_flight(2)
    assert value(registry, "lungserve_queue_depth") == 12
    assert value(registry, "lungserve_batches_in_flight") == 2


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [
        (1, ["1.0"]),
        (2, ["1.0", "2.0"]),
        (32, ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0"]),
        (48, ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "48.0"]),
    ],
)
def test_batch_size_buckets_end_at_max_batch_size(max_batch: int, expected: list[str]) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=max_batch)
    metrics.on_batch_start(1, max_batch, [0.0] * max_batch)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
    les = [s.labels["le"] for s in families["lungserve_batch_size"].samples if s.name.endswith("_bucket")]
    assert les == [*expected, "+Inf"]
    # A full batch is counted in the max bucket itself, not only in +Inf.
    assert value(registry, "lungserve_batch_size_bucket", le=expected[-1]) == 1


def test_batch_size_buckets_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        batch_size_buckets(0)


def test_model_info_is_relabelled_when_the_model_changes(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.set_model(ModelIdentity("lungcnn", "1", SHA_A), "CPUExecutionProvider")
    metrics.set_model(ModelIdentity("lungcnn", "1", SHA_A), "CPUExecutionProvider")  # idempotent
    old = {"name": "lungcnn", "version": "1", "sha256": "a" * 12, "provider": "CPUExecutionProvider"}
    assert registry.get_sample_value("lungserve_model_info", old) == 1

    metrics.set_model(ModelIdentity("lungcnn", "2", SHA_B), "CUDAExecutionProvider")
    new = {"name": "lungcnn", "version": "2", "sha256": "b" * 12, "provider": "CUDAExecutionProvider"}
    assert registry.get_sample_value("lungserve_model_info", old) is None
    assert registry.get_sample_value("lungserve_model_info", new) == 1
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
    assert len(families["lungserve_model_info"].samples) == 1


def test_model_ready(metrics: Metrics, registry: CollectorRegistry) -> None:
    assert value(registry, "lungserve_model_ready") == 0
    metrics.set_ready(True)
    assert value(registry, "lungserve_model_ready") == 1
    metrics.set_ready(False)
    assert value(registry, "lungserve_model_ready") == 0


def test_exposition_parses_and_names_follow_conventions(metrics: Metrics) -> None:
    metrics.observe_request("/v1/predict", 200, 0.01)
    metrics.image_outcome("ok")
    metrics.on_batch_start(1, 1, [0.001])
    metrics.on_batch_end(1, 1, 0.002, None)
    metrics.set_model(ModelIdentity("lungcnn", "1", SHA_A), "CPUExecutionProvider")
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # The classic text format has no `_created` concept: the client emits those as gauges.
    ours = {name: f for name, f in families.items() if name.startswith("lungserve_") and not name.endswith("_created")}
    assert set(ours) == {
        "lungserve_requests",
        "lungserve_request_duration_seconds",
        "lungserve_images",
        "lungserve_queue_wait_seconds",
        "lungserve_decode_seconds",
        "lungserve_inference_seconds",
        "lungserve_batch_size",
        "lungserve_batch_failures",
        "lungserve_decisions",
        "lungserve_queue_depth",
        "lungserve_batches_in_flight",
        "lungserve_rejected",
        "lungserve_predictions",
        "lungserve_model_info",
        "lungserve_model_ready",
        "lungserve_cancelled",
        "lungserve_api_key_requests",
        "lungserve_uploads_in_flight",
        "lungserve_body_bytes_in_flight",
        "lungserve_jobs",
        "lungserve_job_tiles",
        "lungserve_job_duration_seconds",
        "lungserve_process_queue_depth",
        "lungserve_process_batches_in_flight",
        "lungserve_process_batch_size",
        "lungserve_process_restarts",
        "lungserve_jobs_forwarded",
    }
    for name, family in ours.items():
        if family.type == "counter":  # the parser strips `_total`; every sample carries it
            assert {s.name for s in family.samples} <= {f"{name}_total", f"{name}_created"}
        if family.type == "histogram" and name not in ("lungserve_batch_size", "lungserve_process_batch_size"):
            assert name.endswith("_seconds")
    # Labels are the bounded ones, never ids or file names.
    labels = {key for f in ours.values() for s in f.samples for key in s.labels}
    allowed = {
        "route",
        "status",
        "outcome",
        "reason",
        "decision",
        "label",
        "name",
        "version",
        "sha256",
        "provider",
        "le",
        "key",
        "state",  # a slide job's state (five values)
        "kind",  # a slide-job tile: tissue or background
        "process",  # "server", "front N" (N < LUNGSERVE_WORKERS) or "model"
        "role",  # front or model
    }
    assert labels <= allowed  # `key` is an API key's name from the keys file, never the key


def test_each_app_has_its_own_registry() -> None:
    # Two instances in one process: no "Duplicated timeseries" from a shared global registry.
    a, b = CollectorRegistry(), CollectorRegistry()
    ma, _ = Metrics(a, 8), Metrics(b, 8)
    ma.image_outcome("ok")
    assert a.get_sample_value("lungserve_images_total", {"outcome": "ok"}) == 1
    assert b.get_sample_value("lungserve_images_total", {"outcome": "ok"}) == 0


def test_metrics_is_the_batchers_observer(metrics: Metrics) -> None:
    observers: list[BatchObserver] = [metrics, metrics.batcher_observer()]  # mypy checks the match
    assert len(observers) == 2


@pytest.mark.anyio
async def test_a_real_batcher_reports_exact_counts(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, max_batch_size=4)
    batcher: Batcher[int, int] = Batcher(
        lambda items: [i * 2 for i in items],
        max_batch_size=4,
        max_batch_delay_s=0.0,
        queue_limit=16,
        observer=metrics,
    )
    await batcher.start()
    try:
        with batcher.reserve(6) as reservation:
            futures = [reservation.submit(i) for i in range(6)]
            futures[5].cancel()  # the client went away while its item was queued
        results = await asyncio.gather(*futures[:5])
    finally:
        await batcher.stop()
    assert [r for r, _ in results] == [0, 2, 4, 6, 8]
    assert value(registry, "lungserve_batch_size_sum") == 5
    assert value(registry, "lungserve_queue_wait_seconds_count") == 5
    assert value(registry, "lungserve_inference_seconds_count") == value(registry, "lungserve_batch_size_count")
    assert value(registry, "lungserve_batch_failures_total") == 0
    assert value(registry, "lungserve_cancelled_total") == 1
    assert value(registry, "lungserve_queue_depth") == 0
    assert value(registry, "lungserve_batches_in_flight") == 0


# --- the runtime's PredictionObserver ------------------------------------------------------


def _classified(label_index: int) -> Classified:
    manifest = Manifest(
        name="lungcnn",
        version="7",
        classes=["lung_aca", "lung_n", "lung_scc"],
        input_name="image",
        output_name="probs",
        input_size=32,
        resize=RESIZE,
        sha256="0" * 64,
    )
    probs = np.full(3, 0.1, dtype=np.float32)
    probs[label_index] = 0.8
    return Classified(probs, manifest, ACCEPT)


def test_prediction_observer_outside_a_request_only_counts(registry: CollectorRegistry) -> None:
    observer: PredictionObserver = PredictionMetrics(Metrics(registry, max_batch_size=8))
    observer.on_decoded(0.004)
    observer.on_classified(_classified(1), BatchInfo(batch_id=3, size=2, queue_wait_s=0.001, compute_s=0.01))
    assert value(registry, "lungserve_decode_seconds_count") == 1
    assert value(registry, "lungserve_images_total", outcome="ok") == 1
    assert value(registry, "lungserve_predictions_total", label="lung_n") == 1
    assert value(registry, "lungserve_decisions_total", decision="accept", reason="none") == 1
    assert value(registry, "lungserve_decisions_total", decision="refer", reason="low_confidence") == 0


def test_prediction_observer_fills_the_request_context(registry: CollectorRegistry) -> None:
    observer = PredictionMetrics(Metrics(registry, max_batch_size=8))
    ctx = RequestContext("rid")
    with use_request(ctx):
        for _ in range(3):
            observer.on_decoded(0.002)
        observer.on_classified(_classified(0), BatchInfo(batch_id=3, size=2, queue_wait_s=0.001, compute_s=0.01))
        observer.on_classified(_classified(2), BatchInfo(batch_id=3, size=2, queue_wait_s=0.002, compute_s=0.01))
        observer.on_image_failed(InvalidImage("not an image"))
        observer.on_image_abandoned()
    assert ctx.images == 4
    assert ctx.model_version == "7"
    assert ctx.timing.batches == {3: 2}
    assert server_timing(ctx.timing) == "queue;dur=2.000, decode;dur=6.000, infer;dur=10.000"
    assert value(registry, "lungserve_predictions_total", label="lung_aca") == 1
    assert value(registry, "lungserve_predictions_total", label="lung_scc") == 1
    assert value(registry, "lungserve_images_total", outcome="invalid") == 1
    assert value(registry, "lungserve_images_total", outcome="cancelled") == 1


@pytest.mark.parametrize(
    ("error", "outcome", "reason"),
    [
        (InvalidImage("x"), "invalid", None),
        (ImageTooLarge("x"), "too_large", None),
        (MissingField("x"), "invalid", "bad_input"),
        (TooManyFiles("x"), "invalid", "bad_input"),
        (Overloaded("x"), "rejected", "queue_full"),
        (DeadlineExceeded("x"), "rejected", "deadline"),
        (ShuttingDown("x"), "rejected", "shutting_down"),
        (ModelNotReady("x"), "rejected", "not_ready"),
        (InferenceFailed("x"), "error", None),
        (ClientGone("x"), None, None),
    ],
)
def test_errors_map_to_bounded_outcomes_and_reasons(
    error: LungserveError, outcome: str | None, reason: str | None
) -> None:
    assert image_outcome_for(error) == outcome
    assert reject_reason_for(error) == reason


def test_a_rejected_request_counts_its_reason_or_its_one_image(registry: CollectorRegistry) -> None:
    observer = PredictionMetrics(Metrics(registry, max_batch_size=8))
    observer.on_rejected(Overloaded("full"))
    observer.on_rejected(MissingField("no file"))
    observer.on_rejected(ImageTooLarge("too big"))  # /predict's one image, refused while read
    observer.on_rejected(ClientGone("gone"))
    assert value(registry, "lungserve_rejected_total", reason="queue_full") == 1
    assert value(registry, "lungserve_rejected_total", reason="bad_input") == 1
    assert value(registry, "lungserve_images_total", outcome="too_large") == 1
    assert value(registry, "lungserve_cancelled_total") == 0


def test_gauges_sum_over_batchers_during_a_reload(metrics: Metrics, registry: CollectorRegistry) -> None:
    old, new = metrics.batcher_observer(), metrics.batcher_observer()
    old.on_queue_depth(5)
    old.on_in_flight(1)
    new.on_queue_depth(2)
    new.on_in_flight(1)
    assert value(registry, "lungserve_queue_depth") == 7
    assert value(registry, "lungserve_batches_in_flight") == 2
    old.on_queue_depth(0)  # the old model drained
    old.on_in_flight(0)
    assert value(registry, "lungserve_queue_depth") == 2
    assert value(registry, "lungserve_batches_in_flight") == 1
    old.on_batch_start(1, 3, [0.0] * 3)
    new.on_batch_start(1, 2, [0.0] * 2)  # batch ids restart per batcher: counted, not keyed
    assert value(registry, "lungserve_batch_size_sum") == 5


def test_per_process_series_name_the_process(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, max_batch_size=8, process="front 1")
    # Present before anything happens, at 0 (a dashboard shows 0, not "no data").
    assert value(registry, "lungserve_process_queue_depth", process="front 1") == 0
    assert value(registry, "lungserve_process_restarts_total", role="model") == 0
    observer = metrics.batcher_observer()
    observer.on_queue_depth(3)
    observer.on_in_flight(1)
    observer.on_batch_start(1, 2, [0.0, 0.0])
    assert value(registry, "lungserve_process_queue_depth", process="front 1") == 3
    assert value(registry, "lungserve_process_batches_in_flight", process="front 1") == 1
    assert value(registry, "lungserve_process_batch_size_sum", process="front 1") == 2
    assert value(registry, "lungserve_queue_depth") == 3  # the server-wide series are unchanged
    metrics.restarted("front")
    assert value(registry, "lungserve_process_restarts_total", role="front") == 1
    with pytest.raises(ValueError, match="unknown process role"):
        metrics.restarted("decoder")  # a typo must not mint a new series
