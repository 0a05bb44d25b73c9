"""Every metric and label the deployment files query exists in a real app's /metrics.

A renamed metric must break this test, not silently turn an alert, the autoscaler or KEDA into a
query that never matches. The files: deploy/prometheus/{recording,alerts}.yaml (and the series of
their promtool tests), the prometheus-adapter rule behind the HPA, and KEDA's ScaledObject query.
The exposition comes from the real app (bundled model, real ONNX Runtime) after one prediction,
so every labelled family has a sample.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.core.engine import CPU, CUDA
from service.observability.metrics import DECISION_LABELS, REJECT_REASONS, status_class
from tests.app.conftest import Served
from tests.images import noise_jpeg

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC_RE = re.compile(r"\b(lungserve_[a-z0-9_]+)\b")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER_RE = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
# Labels the scrape adds (job, instance; namespace and pod from the ServiceMonitor; accelerator by
# relabeling) or that histograms have (le).
TARGET_LABELS = {"instance", "job", "le", "namespace", "pod", "accelerator"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def deployment_queries() -> dict[str, str]:
    """Where -> PromQL (or series selector), from every deployment file that queries lungserve."""
    queries: dict[str, str] = {}
    for name in ("recording.yaml", "alerts.yaml"):
        for group in _yaml(DEPLOY / "prometheus" / name)["groups"]:
            for rule in group["rules"]:
                queries[f"{name}: {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    for i, test in enumerate(_yaml(DEPLOY / "prometheus" / "tests" / "rules.test.yaml")["tests"]):
        for j, series in enumerate(test["input_series"]):
            queries[f"rules.test.yaml: test {i} series {j}"] = series["series"]
    adapter = _yaml(DEPLOY / "kubernetes" / "prometheus-adapter" / "values.yaml")
    for i, rule in enumerate(adapter["rules"]["custom"]):
        series = METRIC_RE.search(rule["seriesQuery"])
        assert series is not None
        queries[f"prometheus-adapter rule {i}: seriesQuery"] = rule["seriesQuery"]
        # The adapter fills in the series and the object's matchers; the rest is PromQL.
        metrics_query = rule["metricsQuery"].replace("<<.Series>>", series.group(1))
        metrics_query = metrics_query.replace("<<.LabelMatchers>>", 'namespace="x"').replace("<<.GroupBy>>", "pod")
        queries[f"prometheus-adapter rule {i}: metricsQuery"] = metrics_query
    scaled = _yaml(DEPLOY / "kubernetes" / "components" / "keda" / "scaledobject.yaml")
    for i, trigger in enumerate(scaled["spec"]["triggers"]):
        queries[f"KEDA trigger {i}"] = trigger["metadata"]["query"]
    return queries


async def exposition(served: Served) -> dict[str, set[str]]:
    """Sample name -> label names, from GET /metrics after one prediction."""
    r = await served.client.post("/predict", files={"file": ("a.jpeg", noise_jpeg(), "image/jpeg")})
    assert r.status_code == 200, r.text
    text = (await served.client.get("/metrics")).text
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


async def test_every_metric_and_label_the_deployment_queries_is_exposed(served: Served) -> None:
    exposed = await exposition(served)
    known_labels = set().union(*exposed.values()) | TARGET_LABELS
    queries = deployment_queries()
    used_metrics: set[str] = set()
    for where, expr in queries.items():
        names = set(METRIC_RE.findall(expr))
        used_metrics |= names
        assert names <= exposed.keys(), (where, names - exposed.keys())
        labels = {x.strip() for g in GROUPING_RE.findall(expr) for x in g.split(",") if x.strip()}
        labels |= {m[0] for m in MATCHER_RE.findall(expr)}
        assert labels - {"__name__"} <= known_labels, (where, labels - known_labels)
    # The signals the fleet relies on are among them.
    needed = {
        "lungserve_queue_depth",
        "lungserve_model_ready",
        "lungserve_model_info",
        "lungserve_requests_total",
        "lungserve_rejected_total",
        "lungserve_queue_wait_seconds_bucket",
    }
    assert needed <= used_metrics


def test_label_values_the_rules_match_are_values_the_service_emits() -> None:
    allowed = {
        # `reason` of lungserve_rejected_total and of lungserve_decisions_total
        "reason": set(REJECT_REASONS) | {reason for _, reason in DECISION_LABELS},
        "decision": {decision for decision, _ in DECISION_LABELS},
        "status": {status_class(s) for s in (100, 200, 300, 400, 500)},
        "provider": {CPU, CUDA},
        "accelerator": {"cpu", "gpu"},
        "job": {"lungserve"},
    }
    for where, expr in deployment_queries().items():
        if where.startswith("rules.test.yaml"):
            continue  # test data may use any value
        for label, op, value in MATCHER_RE.findall(expr):
            if label in allowed and op in ("=", "!="):
                assert value in allowed[label], (where, label, value)
