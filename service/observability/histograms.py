"""Many observations of one Prometheus histogram at once: the batcher reports a queue wait for
every image of a batch, and `Histogram.observe` per value (a lock, a Python loop over the
buckets, in multiprocess mode a file write each) cost microseconds per image on the loop that
answers every front. Here each bucket a batch touches is updated once."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import Histogram


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """The same counts and sum as `histogram.observe(v)` for each value (to float rounding)."""
    # prometheus_client's own fields; a version without them gets the plain loop.
    bounds: Sequence[float] | None = getattr(histogram, "_upper_bounds", None)
    buckets: list[Any] | None = getattr(histogram, "_buckets", None)
    total: Any = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(values) < 2:
        for value in values:
            histogram.observe(value)
        return
    counts: dict[int, int] = {}
    for value in values:
        # observe() counts a value in the first bucket whose bound is >= it (a NaN in none).
        if not math.isnan(value):
            i = bisect_left(bounds, value)
            counts[i] = counts.get(i, 0) + 1
    total.inc(math.fsum(values))
    for i, count in counts.items():
        buckets[i].inc(count)
