"""The Helm chart, checked without a cluster.

Helm's own Go code lints and renders it (helm-python-sdk bundles the Helm SDK as a library:
the same engine as ``helm lint`` / ``helm template``), and every rendered manifest of a core
kind is validated against the Kubernetes OpenAPI JSON schemas (kubernetes-validate, strict:
unknown fields are errors). The prometheus-operator kinds (ServiceMonitor, PrometheusRule)
have no schema there: their fields are checked here, and the PrometheusRule against the
rule files it is made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm  # helm-python-sdk (requirements-test.txt)
import kubernetes_validate  # kubernetes-validate (requirements-test.txt)
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy/helm/lossd"
KUBERNETES_VERSIONS = ("1.27.0", "1.30.0", "1.33.0")  # the chart's kubeVersion floor, and later ones
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
PLAIN = {"tls": {"enabled": False}, "auth": {"enabled": False}, "allowInsecure": True}
MUTUAL_TLS = {"tls": {"clientCA": {"enabled": True}, "probeClientSecretName": "lossd-probe-client"}, "auth": {"enabled": False}}


def _render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The chart's manifests as ``{kind/name: object}``, rendered as release ``lossd`` in namespace ``ml``."""
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values, name="lossd", namespace="ml", is_install=True)
    objects: dict[str, dict[str, Any]] = {}
    for path, text in rendered.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def _container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objects["Deployment/lossd"]["spec"]["template"]["spec"]["containers"]
    return container


def _env(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in _container(objects)["env"]}


def test_helm_lint_is_clean() -> None:
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == [], report
    # Severity 1 is helm's "info" (the icon suggestion); warnings (2) and errors (4) fail.
    assert all(message["severity"] <= 1 for message in report["messages"]), report["messages"]


@pytest.mark.parametrize(
    "values",
    [
        None,
        PLAIN,
        MUTUAL_TLS,
        {"gpu": {"enabled": True}},
        {"autoscaling": {"enabled": False, "cpuUtilization": None}},
        {"dashboard": {"prometheusUrl": "http://prometheus-operated.monitoring.svc:9090"}},
    ],
    ids=["default", "plain", "mutual-tls", "gpu", "no-autoscaling", "fleet-dashboard"],
)
def test_rendered_manifests_match_the_kubernetes_schemas(values: dict[str, Any] | None) -> None:
    objects = _render(values)
    core = {key: obj for key, obj in objects.items() if obj["kind"] not in CRD_KINDS}
    assert {"Deployment/lossd", "Service/lossd", "Service/lossd-headless", "PodDisruptionBudget/lossd", "ServiceAccount/lossd"} <= set(core)
    for version in KUBERNETES_VERSIONS:
        for key, obj in core.items():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{key} is not a valid Kubernetes {version} object: {exc.message} at {list(exc.path)}")


def test_probes_follow_the_transport() -> None:
    plain = _container(_render(PLAIN))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert plain[probe]["grpc"] == {"port": 50051}, "without TLS the kubelet's native gRPC probe asks grpc.health.v1"
    tls = _container(_render())
    assert tls["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTPS"}
    assert tls["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mutual = _render(MUTUAL_TLS)
    assert _container(mutual)["readinessProbe"]["exec"]["command"] == ["python", "/usr/local/lib/lossd-docker/healthcheck.py"]
    env = _env(mutual)
    assert env["LOSSD_TLS_CLIENT_CA_FILE"] == "/etc/lossd/tls/ca.crt"
    assert env["LOSSD_HEALTHCHECK_CLIENT_CERT_FILE"].startswith("/etc/lossd/probe-client/")
    assert env["LOSSD_HEALTHCHECK_SERVER_NAME"] == "lossd-headless.ml.svc"


def test_shutdown_drains_within_the_grace_period() -> None:
    objects = _render()
    pod = objects["Deployment/lossd"]["spec"]["template"]["spec"]
    container = _container(objects)
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    env = _env(objects)
    needed = int(sleep[1]) + int(env["LOSSD_DRAIN_SECONDS"]) + int(env["LOSSD_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > needed, "the kubelet must not SIGKILL a pod that is still draining"


def test_tls_and_tokens_come_from_secrets() -> None:
    objects = _render()
    pod = objects["Deployment/lossd"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "lossd-tls"
    assert volumes["tokens"]["secret"]["secretName"] == "lossd-tokens"
    mounts = {m["name"]: m for m in _container(objects)["volumeMounts"]}
    assert all(mounts[name]["readOnly"] and "subPath" not in mounts[name] for name in ("tls", "tokens")), (
        "no subPath: updates reach the pod"
    )
    env = _env(objects)
    assert env["LOSSD_TLS_CERT_FILE"] == "/etc/lossd/tls/tls.crt" and env["LOSSD_TLS_KEY_FILE"] == "/etc/lossd/tls/tls.key"
    assert env["LOSSD_AUTH_TOKENS_FILE"] == "/etc/lossd/tokens/tokens" and env["LOSSD_HOST"] == "0.0.0.0"
    assert "LOSSD_ALLOW_INSECURE" not in env
    plain = _render(PLAIN)
    assert _env(plain)["LOSSD_ALLOW_INSECURE"] == "true"
    assert {v["name"] for v in plain["Deployment/lossd"]["spec"]["template"]["spec"]["volumes"]} == {"tmp", "home"}


def test_an_open_bind_is_refused_unless_asked_for() -> None:
    with pytest.raises(helm.HelmError, match="allowInsecure"):
        _render({"tls": {"enabled": False}, "auth": {"enabled": False}})
    with pytest.raises(helm.HelmError, match="probeClientSecretName"):
        _render({"tls": {"clientCA": {"enabled": True}}})
    with pytest.raises(helm.HelmError, match="/probes/mode"):
        _render({"probes": {"mode": "tcp"}})


def test_values_schema_refuses_misspelt_and_mistyped_values() -> None:
    with pytest.raises(helm.HelmError, match="'enable' not allowed"):
        _render({"tls": {"enable": True}})  # tls.enabled misspelt would otherwise be ignored
    with pytest.raises(helm.HelmError, match="/gpu/count"):
        _render({"gpu": {"enabled": True, "count": "one"}})
    with pytest.raises(helm.HelmError, match="'DRAIN' does not match"):
        _render({"extraEnv": {"DRAIN": "1"}})  # not a LOSSD_* setting
    assert _env(_render({"extraEnv": {"LOSSD_LABEL_MAX_VALUES": 50}}))["LOSSD_LABEL_MAX_VALUES"] == "50"


def test_dashboard_draws_the_fleet_from_prometheus_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from lossd.server.settings import Settings

    url = "http://prometheus-operated.monitoring.svc:9090"
    env = _env(_render({"dashboard": {"prometheusUrl": url}}))
    assert env["LOSSD_PROMETHEUS_URL"] == url
    monkeypatch.setenv("LOSSD_PROMETHEUS_URL", env["LOSSD_PROMETHEUS_URL"])
    assert Settings(device="cpu").prometheus_url == url, "the chart's variable is the server's prometheus_url setting"
    assert "LOSSD_PROMETHEUS_URL" not in _env(_render()), "default: each pod's embedded in-memory history"
    with pytest.raises(helm.HelmError, match="/dashboard/prometheusUrl"):
        _render({"dashboard": {"prometheusUrl": "prometheus:9090"}})  # no scheme: httpx could not query it


def test_gpu_values_request_a_gpu_and_the_cuda_image() -> None:
    cpu = _render()
    assert _container(cpu)["image"] == "lossd:0.1.0-cpu" and "nvidia.com/gpu" not in _container(cpu)["resources"]["limits"]
    gpu = _render({"gpu": {"enabled": True}})
    container = _container(gpu)
    assert container["image"] == "lossd:0.1.0-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["resources"]["limits"]["memory"] == "8Gi"
    assert _env(gpu)["LOSSD_DEVICE"] == "cuda" and _env(cpu)["LOSSD_DEVICE"] == "cpu"
    tolerations = gpu["Deployment/lossd"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_services_headless_for_client_balancing_and_cluster_ip_for_the_gateway() -> None:
    objects = _render()
    headless, gateway = objects["Service/lossd-headless"]["spec"], objects["Service/lossd"]["spec"]
    assert headless["clusterIP"] == "None" and gateway["type"] == "ClusterIP" and "clusterIP" not in gateway
    pod_labels = objects["Deployment/lossd"]["spec"]["template"]["metadata"]["labels"]
    for spec in (headless, gateway):
        assert spec["selector"].items() <= pod_labels.items()
        assert {p["name"]: p["port"] for p in spec["ports"]} == {"grpc": 50051, "http": 8000}


def test_autoscaler_reads_an_exported_in_flight_metric() -> None:
    from prometheus_client import CollectorRegistry

    from lossd.server.monitoring.interceptor import GrpcMetrics

    registry = CollectorRegistry()
    GrpcMetrics(registry)
    exported = {metric.name for metric in registry.collect()}
    objects = _render()
    hpa = objects["HorizontalPodAutoscaler/lossd"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lossd"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in exported
    assert "replicas" not in objects["Deployment/lossd"]["spec"], "the HPA owns the replica count"
    fixed = _render({"autoscaling": {"enabled": False}})
    assert "HorizontalPodAutoscaler/lossd" not in fixed and fixed["Deployment/lossd"]["spec"]["replicas"] == 2
    pdb = objects["PodDisruptionBudget/lossd"]["spec"]
    assert (
        pdb["maxUnavailable"] == 1
        and pdb["selector"]["matchLabels"].items() <= objects["Deployment/lossd"]["spec"]["selector"]["matchLabels"].items()
    )


def test_service_monitor_scrapes_every_pod_with_the_server_transport() -> None:
    objects = _render()
    monitor = objects["ServiceMonitor/lossd"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= objects["Service/lossd-headless"]["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= objects["Service/lossd"]["metadata"]["labels"].items(), (
        "scraping the load-balanced Service would count one replica per scrape"
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "lossd-tls", "key": "ca.crt"}
    assert endpoint["authorization"]["type"] == "Bearer"
    (plain,) = _render(PLAIN)["ServiceMonitor/lossd"]["spec"]["endpoints"]
    assert plain["scheme"] == "http" and "tlsConfig" not in plain and "authorization" not in plain


def test_prometheus_rule_is_the_rule_files_unchanged() -> None:
    rule = _render()["PrometheusRule/lossd"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    files = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
    assert len(files) >= 2
    expected = [group for path in files for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    assert (CHART / "rules").resolve() == (ROOT / "deploy/prometheus/rules").resolve(), "the chart links the files, never copies them"


def test_mutual_tls_reaches_the_service_monitor() -> None:
    (endpoint,) = _render(MUTUAL_TLS)["ServiceMonitor/lossd"]["spec"]["endpoints"]
    assert endpoint["tlsConfig"]["cert"]["secret"] == {"name": "lossd-probe-client", "key": "tls.crt"}
    assert endpoint["tlsConfig"]["keySecret"] == {"name": "lossd-probe-client", "key": "tls.key"}
    (default,) = _render()["ServiceMonitor/lossd"]["spec"]["endpoints"]
    assert "cert" not in default["tlsConfig"]


def test_rendered_yaml_has_no_blank_padding() -> None:
    rendered = helm.Chart.load(CHART).render(MUTUAL_TLS, name="lossd", namespace="ml")
    for path, text in rendered.items():
        padded = [n for n, line in enumerate(text.splitlines(), 1) if line and not line.strip()]
        assert not padded, f"{path}: whitespace-only lines {padded}"
