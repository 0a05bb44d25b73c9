"""deploy/kubernetes renders with `kubectl kustomize`, every object is valid offline, and the
manifests keep the promises the service's contract needs.

Validation, offline:
- core kinds (Deployment, Service, HPA, PDB, NetworkPolicy, ServiceAccount): kubernetes-validate's
  bundled schemas for K8S_VERSION, strict (unknown fields are errors);
- ServiceMonitor and ScaledObject: their CRDs' openAPIV3Schema, vendored in tests/schemas (see
  NOTICE there), made strict the way the API server prunes (unknown fields are errors);
- InferenceService (KServe's CRD is 2 MB, not vendored): a structural check. Its predictor is a
  Kubernetes PodSpec plus KServe's own fields, so the PodSpec part is validated strictly as a Pod
  by kubernetes-validate, and the rest must be among the predictor fields of KServe's v1beta1 CRD.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # no stubs; offline schemas only
import pytest
import yaml

from service.app import create_app
from service.http.access import OPEN_ROUTES
from service.settings import Settings
from tests.system_tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
SCHEMAS = ROOT / "tests" / "schemas"
OVERLAYS = ("cpu", "gpu", "keda")
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to fit (docs/deploy.md)
MIN_KUBECTL = (1, 27)  # kustomize v5 (components, `labels`) is built in from here

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "scaledobject-keda.sh-v1alpha1.json",
}
# Predictor fields of KServe's InferenceService v1beta1 CRD that are not PodSpec fields (from
# charts/kserve-crd/templates/serving.kserve.io_inferenceservices.yaml of kserve/kserve at commit
# aaac4e294dae2c7b1aa1886447793f3aa1c30912).
KSERVE_PREDICTOR_FIELDS = frozenset({
    "annotations", "autoScaling", "batcher", "canaryTrafficPercent", "containerConcurrency", "deploymentStrategy",
    "huggingface", "labels", "lightgbm", "logger", "maxReplicas", "minReplicas", "model", "onnx", "paddle", "pmml",
    "pytorch", "scaleMetric", "scaleMetricType", "scaleTarget", "sklearn", "storageContainerName", "storageUris",
    "tensorflow", "timeout", "triton", "workerSpec", "xgboost",
})  # fmt: skip


def _kubectl() -> str:
    kubectl = require_tool("kubectl", "kubernetes-client")
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout)["clientVersion"]
    version = (int(info["major"]), int(re.sub(r"\D.*", "", info["minor"])))
    if version < MIN_KUBECTL:
        pytest.fail(
            f"kubectl {info['gitVersion']} is too old: `kubectl kustomize` needs kubectl >= 1.27 (kustomize v5)"
        )
    return kubectl


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = _kubectl()
    out: dict[str, list[dict[str, Any]]] = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [kubectl, "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = by_kind(objects, kind)
    return obj


def all_objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay, objects in rendered.items():
        for obj in objects:
            yield overlay, obj


def strict_crd_schema(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema that rejects unknown fields (the API server would
    silently prune them, which hides typos)."""
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_crd_schema(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_crd(obj: dict[str, Any]) -> None:
    path = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    schema = strict_crd_schema(json.loads(path.read_text()))
    # metadata is the API server's ObjectMeta, validated by the core schemas; the CRD leaves it open.
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft7Validator(schema).validate(obj)


def validate_inference_service(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
    assert obj["kind"] == "InferenceService"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    assert set(obj["spec"]) <= {"predictor", "transformer", "explainer"}
    predictor = obj["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": obj["metadata"], "spec": pod_spec}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def validate(obj: dict[str, Any]) -> None:
    if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
        validate_crd(obj)
    elif obj["kind"] == "InferenceService":
        validate_inference_service(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_overlay_renders_the_objects_a_deployment_needs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    expected = {"ServiceAccount", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}
    for overlay, objects in rendered.items():
        kinds = [o["kind"] for o in objects]
        assert expected <= set(kinds), overlay
        assert len(kinds) == len(set(kinds)), overlay
        # Exactly one autoscaler: the HPA, or KEDA's ScaledObject (which makes its own HPA).
        autoscalers = {"HorizontalPodAutoscaler", "ScaledObject"} & set(kinds)
        assert autoscalers == ({"ScaledObject"} if overlay == "keda" else {"HorizontalPodAutoscaler"}), overlay


def test_every_rendered_object_is_valid_offline(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, obj in all_objects(rendered):
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_the_kserve_example_is_valid() -> None:
    obj = yaml.safe_load((KUBE / "kserve" / "inferenceservice.yaml").read_text())
    validate(obj)
    [container] = obj["spec"]["predictor"]["containers"]
    assert container["image"].startswith("lungserve:")
    assert container["args"][:2] == ["lungserve", "serve"]


def test_the_validators_reject_what_they_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A check that cannot fail proves nothing: a typo in each kind of object is caught."""
    objects = rendered["cpu"]
    deployment = copy.deepcopy(one(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    monitor = copy.deepcopy(one(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    scaled = copy.deepcopy(one(rendered["keda"], "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "two"
    isvc = yaml.safe_load((KUBE / "kserve" / "inferenceservice.yaml").read_text())
    isvc["spec"]["predictor"]["containers"][0]["imagePullPolicy"] = {"bad": 1}
    for broken in (deployment, monitor, scaled, isvc):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    [c] = containers
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def test_probe_paths_are_routes_of_the_app(rendered: dict[str, list[dict[str, Any]]]) -> None:
    routes = set(create_app(Settings()).openapi()["paths"])
    isvc = yaml.safe_load((KUBE / "kserve" / "inferenceservice.yaml").read_text())
    containers = [container(objects) for objects in rendered.values()] + isvc["spec"]["predictor"]["containers"]
    for c in containers:
        assert c["startupProbe"]["httpGet"]["path"] == "/health/ready"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] in routes
            assert c[probe]["httpGet"]["path"] in OPEN_ROUTES  # probes need no API key
            port = c[probe]["httpGet"]["port"]
            assert port in {p.get("name") for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}


def _sleep_s(pod: dict[str, Any], c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def shutdown_budget_s(env: dict[str, str]) -> float:
    """After SIGTERM: readiness 503 with the listener open, then uvicorn waits up to
    max(drain, request deadline) + 5 s for the drained answers (service/http/server.py)."""
    values = {k.removeprefix("LUNGSERVE_").lower(): v for k, v in env.items() if k.startswith("LUNGSERVE_")}
    s = Settings.model_validate(values)
    return s.shutdown_delay_s + max(s.drain_timeout_s, s.request_deadline_s) + 5


def test_grace_period_covers_pre_stop_and_the_whole_shutdown(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """SIGKILL must never cut an admitted request: preStop, the shutdown delay, the drain and
    uvicorn's wait for the answers fit in terminationGracePeriodSeconds (docs/reliability.md)."""
    isvc = yaml.safe_load((KUBE / "kserve" / "inferenceservice.yaml").read_text())
    pods = [one(objects, "Deployment")["spec"]["template"]["spec"] for objects in rendered.values()]
    pods.append(isvc["spec"]["predictor"])
    for pod in pods:
        [c] = pod["containers"]
        assert pod["terminationGracePeriodSeconds"] > _sleep_s(pod, c) + shutdown_budget_s(env_of(c))


def test_pods_run_non_root_on_a_read_only_root_with_the_model_cache_on_an_empty_dir(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, objects in rendered.items():
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        c = container(objects)
        assert pod["securityContext"]["runAsNonRoot"] is True, overlay
        assert pod["securityContext"]["runAsUser"] != 0, overlay
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, overlay
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, overlay
        assert {"requests", "limits"} <= c["resources"].keys(), overlay
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        cache = Path(env_of(c)["LUNGSERVE_MODEL_CACHE_DIR"])
        assert any(cache.is_relative_to(path) and name in empty_dirs for path, name in mounts.items()), overlay
        assert mounts.get("/tmp") in empty_dirs, overlay


def test_every_lungserve_variable_is_a_setting(rendered: dict[str, list[dict[str, Any]]]) -> None:
    isvc = yaml.safe_load((KUBE / "kserve" / "inferenceservice.yaml").read_text())
    containers = [container(objects) for objects in rendered.values()] + isvc["spec"]["predictor"]["containers"]
    fields = set(Settings.model_fields)
    for c in containers:
        for name in env_of(c):
            if name.startswith("LUNGSERVE_"):
                assert name.removeprefix("LUNGSERVE_").lower() in fields, name
        # Every value is one the server accepts (it would refuse to start otherwise).
        values = {k.removeprefix("LUNGSERVE_").lower(): v for k, v in env_of(c).items() if k.startswith("LUNGSERVE_")}
        Settings.model_validate(values)


def test_every_pod_pins_its_fronts_to_its_cpu_limit(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """LUNGSERVE_WORKERS unset would be the same number (the cgroup quota), but a pinned one makes a
    change of CPU limit a visible change of processes (and of model copies on CPU)."""
    isvc = yaml.safe_load((KUBE / "kserve" / "inferenceservice.yaml").read_text())
    containers = {o: container(objects) for o, objects in rendered.items()}
    containers["kserve"] = isvc["spec"]["predictor"]["containers"][0]
    for name, c in containers.items():
        assert env_of(c)["LUNGSERVE_WORKERS"] == str(c["resources"]["limits"]["cpu"]), name


def test_cpu_and_gpu_overlays_differ_where_they_must(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cpu, gpu = container(rendered["cpu"]), container(rendered["gpu"])
    assert cpu["image"].endswith(":cpu")
    assert gpu["image"].endswith(":gpu")
    assert env_of(cpu)["LUNGSERVE_PROVIDER"] == "cpu"
    assert env_of(gpu)["LUNGSERVE_PROVIDER"] == "cuda"  # no silent CPU fallback on a GPU node
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    # A container sees the node's cores: the thread counts follow the pod's CPU request instead.
    for c in (cpu, gpu):
        cores = int(c["resources"]["requests"]["cpu"])
        assert int(env_of(c)["LUNGSERVE_PREPROCESS_WORKERS"]) <= cores
    labels = {o: one(rendered[o], "Deployment")["spec"]["template"]["metadata"]["labels"] for o in ("cpu", "gpu")}
    assert labels["cpu"]["lungserve.io/accelerator"] == "cpu"
    assert labels["gpu"]["lungserve.io/accelerator"] == "gpu"


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_and_references_line_up(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objects in rendered.items():
        deployment = one(objects, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        service = one(objects, "Service")
        assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels), overlay
        assert _matches(service["spec"]["selector"], pod_labels), overlay
        assert _matches(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels), overlay
        assert _matches(one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels), overlay
        monitor = one(objects, "ServiceMonitor")
        assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]), overlay
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
        assert (
            deployment["spec"]["template"]["spec"]["serviceAccountName"]
            == one(objects, "ServiceAccount")["metadata"]["name"]
        )
        target = next(iter(by_kind(objects, "HorizontalPodAutoscaler") + by_kind(objects, "ScaledObject")))
        assert target["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"], overlay
        if target["kind"] == "ScaledObject":
            namespace = deployment["metadata"]["namespace"]
            for trigger in target["spec"]["triggers"]:
                assert f'namespace="{namespace}"' in trigger["metadata"]["query"], overlay


def test_the_hpa_reads_the_metrics_the_adapter_serves(rendered: dict[str, list[dict[str, Any]]]) -> None:
    adapter = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    for rule in adapter["rules"]["custom"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per pod
    targets = {}
    for overlay in ("cpu", "gpu"):
        hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
        metrics = hpa["spec"]["metrics"]
        assert {m["type"] for m in metrics} == {"Pods"}  # per pod, averaged by the HPA
        names = [m["pods"]["metric"]["name"] for m in metrics]
        assert set(names) == served, overlay
        assert hpa["spec"]["minReplicas"] >= 2  # with the PDB, one pod may always be disrupted
        targets[overlay] = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in metrics}
    # A GPU pod clears a deeper queue and serves more images/s.
    for name in served:
        assert targets["gpu"][name] > targets["cpu"][name], name
    # KEDA's triggers use the same targets as the CPU HPA it replaces.
    [scaled] = by_kind(rendered["keda"], "ScaledObject")
    thresholds = sorted(float(t["metadata"]["threshold"]) for t in scaled["spec"]["triggers"])
    assert thresholds == sorted(targets["cpu"].values())
