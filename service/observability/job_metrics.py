"""Slide-job collectors, on the app's own registry (built by `Metrics`).

Bounded labels only: the job state (five values), the tile kind (two), the final state of a
finished job (three). Never a job id: ids are unbounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

JOB_STATES: Final = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES: Final = ("done", "failed", "cancelled")
# Several fronts (docs/topology.md): what became of a /jobs request a front forwarded to front 0.
FORWARD_OUTCOMES: Final = ("answered", "unavailable")
# A slide job takes seconds (a biopsy) to hours (a 10 Gpx resection at CPU speed).
JOB_DURATION_BUCKETS: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)


class JobMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        # Set on every change, not read at scrape time: a callback's value never reaches the
        # shared files of multiprocess mode. Front 0 runs the jobs and the other fronts hold 0s,
        # so the live sum is front 0's count, and a dead front 0's files drop out with it.
        self.jobs = Gauge(
            f"{prefix}_jobs",
            "Slide jobs known to this server, by state.",
            ["state"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.tiles = Counter(
            f"{prefix}_job_tiles",
            "Slide-job tiles processed (rate() is tiles/s), by kind: tissue (classified) or background (skipped).",
            ["kind"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}_job_duration_seconds",
            "From a job's start to its end (restarts included), by final state.",
            ["state"],
            buckets=JOB_DURATION_BUCKETS,
            registry=registry,
        )
        self.forwarded_requests = Counter(
            f"{prefix}_jobs_forwarded",
            "Requests under /jobs a front passed to front 0 (which runs the jobs), by outcome: answered "
            "there, or unavailable (front 0 not answering: this front answered 503).",
            ["outcome"],
            registry=registry,
        )
        for outcome in FORWARD_OUTCOMES:
            self.forwarded_requests.labels(outcome=outcome)
        for kind in ("tissue", "background"):
            self.tiles.labels(kind=kind)
        for state in FINAL_STATES:
            self.duration.labels(state=state)
        for state in JOB_STATES:
            self.jobs.labels(state=state).set(0)

    def count(self, jobs: Mapping[str, int]) -> None:
        """The jobs gauge set from the runner's jobs per state (after every change of a job's state)."""
        for state in JOB_STATES:
            self.jobs.labels(state=state).set(jobs.get(state, 0))

    def tile(self, tissue: bool) -> None:
        self.tiles.labels(kind="tissue" if tissue else "background").inc()

    def forwarded(self, outcome: str) -> None:
        if outcome not in FORWARD_OUTCOMES:  # a typo must not mint a new series
            raise ValueError(f"unknown forward outcome {outcome!r}")
        self.forwarded_requests.labels(outcome=outcome).inc()

    def finished(self, state: str, seconds: float) -> None:
        self.duration.labels(state=state).observe(max(0.0, seconds))
