"""`observe_all`: a batch of observations gives the histogram `observe` would, value by value."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from service.observability.histograms import observe_all

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _samples(histogram_values: list[float], *, bulk: bool) -> dict[str, float]:
    registry = CollectorRegistry()
    histogram = Histogram("wait_seconds", "Waits.", buckets=BUCKETS, registry=registry)
    if bulk:
        observe_all(histogram, histogram_values)
    else:
        for value in histogram_values:
            histogram.observe(value)
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize(
    "values",
    [
        [],
        [0.5],
        [0.0, 0.001, 0.0010001, 0.01, 0.05, 0.1, 1.0, 2.0, 2.0, -1.0],  # on, above and beyond bounds
        [0.003] * 64,
        [0.2, math.inf, 0.0001],
    ],
)
def test_observe_all_counts_as_observe_does(values: list[float]) -> None:
    bulk, one_by_one = _samples(values, bulk=True), _samples(values, bulk=False)
    assert bulk.keys() == one_by_one.keys()
    for name, value in one_by_one.items():
        assert bulk[name] == pytest.approx(value), name


def test_a_nan_is_counted_in_no_bucket_as_observe_does() -> None:
    bulk, one_by_one = _samples([0.5, math.nan], bulk=True), _samples([0.5, math.nan], bulk=False)
    assert {k: v for k, v in bulk.items() if "sum" not in k} == {k: v for k, v in one_by_one.items() if "sum" not in k}
    assert math.isnan(bulk["wait_seconds_sum"])
    assert math.isnan(one_by_one["wait_seconds_sum"])
