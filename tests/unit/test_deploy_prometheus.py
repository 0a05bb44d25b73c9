"""deploy/prometheus and deploy/haproxy: the rule files load, their promtool unit tests pass, the
alerts the fleet needs exist, and the shipped configs are accepted by the real tools.

promtool (Debian's `prometheus`) and haproxy run for real here; `require_tool` installs them in
CI or fails saying what is missing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.system_tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = (PROM / "recording.yaml", PROM / "alerts.yaml")


def run(argv: list[str], cwd: Path = ROOT) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((PROM / "alerts.yaml").read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_rule_files_are_valid() -> None:
    promtool = require_tool("promtool", "prometheus")
    out = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert out.count("SUCCESS") == len(RULE_FILES)


def test_rule_unit_tests_pass() -> None:
    """deploy/prometheus/tests/rules.test.yaml: every alert fires when it should, after its `for:`,
    and stays quiet in a near miss."""
    promtool = require_tool("promtool", "prometheus")
    out = run([promtool, "test", "rules", str(PROM / "tests" / "rules.test.yaml")])
    assert "SUCCESS" in out


def test_every_alert_is_unit_tested_and_waits_before_firing() -> None:
    tests = yaml.safe_load((PROM / "tests" / "rules.test.yaml").read_text())
    tested = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    rules = alerts()
    assert set(rules) == tested
    for name, rule in rules.items():
        assert rule.get("for"), name  # a one-scrape blip never pages anyone
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= rule["annotations"].keys(), name


def test_the_alerts_the_fleet_needs_exist() -> None:
    rules = alerts()
    exprs = {name: " ".join(r["expr"].split()) for name, r in rules.items()}
    # Instance down must look at `up`: a dead process's lungserve_* series just vanish.
    assert exprs["LungserveInstanceDown"] == 'up{job="lungserve"} == 0'
    assert "lungserve_model_ready == 0" in exprs["LungserveModelNotReady"]
    assert exprs["LungserveHigh5xxRatio"].startswith("lungserve:requests_5xx:ratio_rate5m > ")
    recording = yaml.safe_load((PROM / "recording.yaml").read_text())
    records = {r["record"]: " ".join(r["expr"].split()) for g in recording["groups"] for r in g["rules"]}
    assert 'status="5xx"' in records["lungserve:requests_5xx:ratio_rate5m"]
    assert 'reason="queue_full"' in exprs["LungserveQueueFullRejections"]
    assert "queue_wait" in exprs["LungserveQueueWaitP99OverBudget"]
    assert 'accelerator="gpu"' in exprs["LungserveGPUDeploymentOnCPU"]
    assert "CUDAExecutionProvider" in exprs["LungserveGPUDeploymentOnCPU"]


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    """deploy/prometheus/prometheus.yml with the rule files where compose.yaml mounts them."""
    promtool = require_tool("promtool", "prometheus")
    config = (PROM / "prometheus.yml").read_text().replace("/etc/prometheus/rules/", f"{PROM}/")
    (tmp_path / "prometheus.yml").write_text(config)
    out = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert "SUCCESS" in out


def test_haproxy_config_is_valid() -> None:
    haproxy = require_tool("haproxy", "haproxy")
    cfg = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    run([haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")])
    for directive in (
        "option httpchk GET /health/ready",
        "http-check expect status 200",
        "retries 3",
        "option redispatch",
        "retry-on conn-failure empty-response 503",
    ):
        assert directive in cfg, directive
