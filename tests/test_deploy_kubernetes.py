"""The Kubernetes and KServe manifests in docker/kubernetes/, checked without a cluster.

Core objects are validated strictly (no unknown field) against Kubernetes' own OpenAPI schemas
with ``kubernetes-validate``, for the oldest version the manifests are meant for and the newest
the package knows. KServe objects are loaded strictly into the ``kserve`` SDK's generated model
classes (V1alpha1ServingRuntime, V1beta1InferenceService), in a process of their own
(tests/kserve_sdk.py): every field must be one the CRD defines, with the type it defines. Then the manifests are checked against each other and against
the server: container arguments parse as ``muxserve serve`` flags, ports and probe routes are the
ones it listens on and answers, the HPA scales on metrics the adapter serves from series the
server exports, and the adapter's PromQL parses (with ``promtool``, where installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy import http_get_routes, kserve_sdk, parse_serve_args, serve_ports
from helpers import ROOT

from muxserve.serving.observability.metrics import Metrics

K8S_DIR = ROOT / "docker" / "kubernetes"
OLDEST_KUBERNETES = "1.30.0"
KSERVE_GROUP = "serving.kserve.io"


def documents() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (doc,) = objects(kind)
    return doc


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    return container_ports(container)[port] if isinstance(port, str) else port


# ---------------------------------------------------------------------------- schemas


def test_every_manifest_is_checked() -> None:
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == sorted(["Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "ServingRuntime", "InferenceService"])


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_core_objects_validate_against_kubernetes_schemas(version: str) -> None:
    core = [(path, doc) for path, doc in documents() if not doc["apiVersion"].startswith(KSERVE_GROUP)]
    assert core
    for path, doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {exc.message} at {list(exc.path)}")


def test_kserve_objects_load_into_the_sdk_models() -> None:
    paths = sorted(str(p) for p in K8S_DIR.rglob("*.yaml"))
    result = kserve_sdk("load", *paths)
    assert result["errors"] == []
    assert sorted((o["kind"], o["class"]) for o in result["loaded"]) == [("InferenceService", "V1beta1InferenceService"), ("ServingRuntime", "V1alpha1ServingRuntime")]


def test_strict_loading_rejects_what_the_crd_does_not_define(tmp_path: Path) -> None:
    isvc, runtime = one("InferenceService"), one("ServingRuntime")
    isvc["spec"]["predictor"]["model"]["storageURI"] = "pvc://x"  # the field is storageUri
    runtime["spec"]["protocolVersions"] = "v2"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([isvc, runtime]))
    errors = kserve_sdk("load", str(path))["errors"]
    assert len(errors) == 2
    assert "V1beta1ModelSpec has no field(s) ['storageURI']" in errors[0] and "protocolVersions: expected a list" in errors[1]


# ---------------------------------------------------------------------------- plain Deployment


def test_deployment_serves_and_probes_what_the_server_listens_on() -> None:
    deployment = one("Deployment")
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    http_port, grpc_port = serve_ports(parse_serve_args(container["args"]))
    assert container_ports(container) == {"http": http_port, "grpc": grpc_port}
    routes = http_get_routes()
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert probe_port(container[probe], container) == http_port
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == http_port and annotations["prometheus.io/path"] in routes
    security = template["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    # the drain (readiness false, answer what was accepted) needs longer than the pre-stop wait
    assert template["spec"]["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"]


def test_service_routes_both_protocols_to_the_pods() -> None:
    service, deployment = one("Service"), one("Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(container_ports(container))


# ---------------------------------------------------------------------------- autoscaling


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(one("ConfigMap")["data"]["config.yaml"])["rules"]


def exported_metric_names() -> set[str]:
    """Series names of the server's metric families as the exposition writes them."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + suffix for f in Metrics().registry.collect() for suffix in suffixes.get(f.type, [""])}


def test_hpa_scales_the_deployment_on_metrics_the_adapter_serves() -> None:
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    served = {rule["name"]["as"] for rule in adapter_rules()}
    metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}
    assert "muxserve_queue_depth_texts" in metrics
    assert set(metrics) <= served


def test_adapter_rules_read_series_the_server_exports() -> None:
    exported = exported_metric_names()
    for rule in adapter_rules():
        series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
        assert series in exported, f"{series} is not exported by the server"
        assert re.search(rule["name"]["matches"], series)
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_adapter_queries_are_valid_promql(tmp_path: Path) -> None:
    """The adapter fills in <<.Series>>, <<.LabelMatchers>> and <<.GroupBy>>; the result must parse."""
    rules = []
    for i, rule in enumerate(adapter_rules()):
        series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
        expr = rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'namespace="default",pod=~"muxserve-.*"').replace("<<.GroupBy>>", "pod")
        rules.append({"record": f"adapter:rule{i}", "expr": expr})
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- KServe


def test_serving_runtime_speaks_v2_over_http_and_grpc() -> None:
    runtime, isvc = one("ServingRuntime"), one("InferenceService")
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    a = parse_serve_args(container["args"])
    assert a.model_repository == "/mnt/models"  # where KServe's storage initializer puts storageUri
    http_port, grpc_port = serve_ports(a)
    # KServe's port names: http1 for HTTP/1.1, h2c for cleartext HTTP/2 (gRPC)
    assert container_ports(container) == {"http1": http_port, "h2c": grpc_port}
    routes = http_get_routes()
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes and probe_port(container[probe], container) == http_port
    assert int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"]) == http_port
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]]


def test_inference_service_is_a_raw_deployment_scaled_by_the_hpa() -> None:
    annotations = one("InferenceService")["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # KServe's own HPA would scale on CPU; hpa.yaml scales on load instead
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"


def test_environment_names_settings_the_server_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MUXSERVE_* variable of a container is a server setting, with a value it accepts."""
    from muxserve.serving.settings import Settings

    containers = one("Deployment")["spec"]["template"]["spec"]["containers"] + one("ServingRuntime")["spec"]["containers"]
    for container in containers:
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env and all(name.startswith("MUXSERVE_") for name in env)
        for name, value in env.items():
            assert name.removeprefix("MUXSERVE_").lower() in Settings.model_fields, name
            monkeypatch.setenv(name, value)
        settings = Settings.from_env()
        assert settings.workers == int(env["MUXSERVE_WORKERS"])
        # the engine layout is left to the server, which sizes it to the container's CPU limit
        assert "MUXSERVE_THREADS" not in env and "MUXSERVE_INSTANCES" not in env
