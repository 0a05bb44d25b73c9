"""The Grafana dashboard only queries metrics and labels that the service really exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.model.source import ModelIdentity
from service.observability.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lungserve.json"
METRIC_RE = re.compile(r"\b((?:lungserve|process)_[a-z0-9_]+)\b")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
# Added by Prometheus at scrape time, or by histograms.
TARGET_LABELS = {"instance", "job", "le"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Sample name -> label names, from a fresh registry after one call of everything, so
    every labelled family has at least one sample."""
    m = Metrics(CollectorRegistry(), max_batch_size=8)
    m.observe_request("/v1/predict", 200, 0.01)
    m.observe_decode(0.001)
    m.image_outcome("ok")
    m.rejected("queue_full")
    m.prediction("lung_n")
    m.set_model(ModelIdentity("lungcnn", "1", "0" * 64), "CPUExecutionProvider")
    m.set_ready(True)
    m.on_queue_depth(1)
    m.on_batch_start(1, 1, [0.001])
    m.on_batch_end(1, 1, 0.002, None)
    m.on_in_flight(0)
    m.on_dropped_cancelled(1)
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.exposition()[0].decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "lungserve"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_every_queried_metric_is_exposed(dashboard: dict[str, Any], exposed: dict[str, set[str]]) -> None:
    queried = {name for expr in expressions(dashboard) for name in METRIC_RE.findall(expr)}
    assert queried, "no metric found in the dashboard"
    assert queried - exposed.keys() == set()


def test_every_label_used_exists(dashboard: dict[str, Any], exposed: dict[str, set[str]]) -> None:
    known = set().union(*exposed.values()) | TARGET_LABELS
    for expr in expressions(dashboard):
        used = {label.strip() for group in GROUPING_RE.findall(expr) for label in group.split(",") if label.strip()}
        used |= set(MATCHER_RE.findall(expr))
        assert used <= known, (expr, used - known)


def test_the_panels_an_operator_needs_are_there(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(expressions(dashboard))
    for needle in (
        "rate(lungserve_requests_total",  # request rate by route/status
        "histogram_quantile(0.99, sum by (le, route) (rate(lungserve_request_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(lungserve_queue_wait_seconds_bucket",
        "lungserve_batch_size_bucket",  # batch size distribution
        "lungserve_batch_size_sum",  # mean batch size
        "lungserve_queue_depth",
        "lungserve_batches_in_flight",
        "sum by (reason) (rate(lungserve_rejected_total",
        "sum by (label) (rate(lungserve_predictions_total",  # class mix
        "lungserve_model_info",
        "lungserve_model_ready",
    ):
        assert needle in exprs, needle
    heatmaps = [p for p in panels(dashboard) if p["type"] == "heatmap"]
    assert any("lungserve_batch_size_bucket" in t["expr"] for p in heatmaps for t in p["targets"])
