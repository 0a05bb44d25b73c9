"""compose.yaml is a valid Compose file (the Compose Specification's JSON schema, vendored in
tests/schemas with its license) and wires the stack the way docs/deploy.md says.

There is no Docker engine on these machines: the stack itself has never run here. What runs for
real is its parts' configuration: deploy/haproxy/haproxy.cfg and the rule files in the fleet test,
the Prometheus config under promtool (tests/unit/test_deploy_prometheus.py).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert errors == [], [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_the_schema_check_can_fail(compose: dict[str, Any], validator: jsonschema.Draft7Validator) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["lungserve"]["deploy"]["replicas"] = [2]  # strings are allowed (interpolation), lists are not
    broken["services"]["haproxy"]["portz"] = ["8080:8080"]
    assert len(list(validator.iter_errors(broken))) >= 2


def test_the_stack_has_every_part(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"minio", "model-upload", "lungserve", "haproxy", "prometheus", "grafana"}
    assert services["lungserve"]["deploy"]["replicas"] == 2
    # The servers load the model from MinIO, uploaded first by the one-shot job with `lungserve upload`.
    upload = services["model-upload"]
    command = " ".join(upload["command"])
    assert re.search(r"\blungserve upload\b", command)
    uri = services["lungserve"]["environment"]["LUNGSERVE_MODEL_URI"]
    assert uri.startswith("s3://")
    assert uri in command
    assert services["lungserve"]["environment"]["LUNGSERVE_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--endpoint-url http://minio:9000" in command
    assert services["lungserve"]["depends_on"]["model-upload"]["condition"] == "service_completed_successfully"
    assert upload["depends_on"]["minio"]["condition"] == "service_healthy"
    assert upload["restart"] == "no"
    # Read-only root, writable model cache, the grace period covers the drain.
    server = services["lungserve"]
    assert server["read_only"] is True
    cache = server["environment"]["LUNGSERVE_MODEL_CACHE_DIR"]
    assert any(cache.startswith(t.split()[0]) for t in server["tmpfs"])
    settings = Settings.model_validate(
        {
            k.removeprefix("LUNGSERVE_").lower(): v
            for k, v in server["environment"].items()
            if k.startswith("LUNGSERVE_")
        }
    )
    shutdown = settings.shutdown_delay_s + max(settings.drain_timeout_s, settings.request_deadline_s) + 5
    assert int(server["stop_grace_period"].removesuffix("s")) > shutdown
    # Fronts per replica pinned to its CPU limit (the container would read the same quota).
    assert server["environment"]["LUNGSERVE_WORKERS"] == server["deploy"]["resources"]["limits"]["cpus"]


def test_every_mounted_file_exists_and_fits(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, _, _ = volume.partition(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
    prometheus_config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert set(prometheus_config["rule_files"]) <= mounted
    [job] = prometheus_config["scrape_configs"]
    assert job["job_name"] == "lungserve"  # what LungserveInstanceDown selects
    assert job["dns_sd_configs"][0]["names"] == ["lungserve"]
    haproxy = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    replicas = compose["services"]["lungserve"]["deploy"]["replicas"]
    assert f"server-template lungserve {replicas} lungserve:8000" in haproxy


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard(compose: dict[str, Any]) -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    [provider] = yaml.safe_load((provisioning / "dashboards" / "lungserve.yaml").read_text())["providers"]
    volumes = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert volumes["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_in_container = volumes["./deploy/grafana/lungserve.json"]
    assert Path(dashboard_in_container).parent == Path(provider["options"]["path"])
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "lungserve.json").read_text())
    assert dashboard["templating"]["list"][0]["query"] == source["type"]  # its data-source variable finds it
