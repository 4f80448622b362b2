"""The container artefacts, checked without a Docker engine: hadolint, structure, and the compose stack's references."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import require_binary

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf = f"{buf} {line[:-1]}" if line.endswith("\\") else f"{buf} {line}"
        if not line.endswith("\\"):
            instr, _, rest = buf.strip().partition(" ")
            lines.append((instr.upper(), rest.strip()))
            buf = ""
    return lines


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__file__).resolve().parents[2] / ".venv/bin/hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name (``FROM image AS name``); ARGs before the first FROM are under ''."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for instr, rest in instructions:
        if instr == "FROM":
            words = rest.split()
            current = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else rest
            stages[current] = []
        stages[current].append((instr, rest))
    return stages


def test_dockerfile_is_multi_stage_with_a_cached_dependency_layer() -> None:
    stages = _stages(_dockerfile())
    assert list(stages) == ["", "deps", "build", "runtime"], list(stages)
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in stages[""]
    deps = stages["deps"]
    copied = [rest for instr, rest in deps if instr == "COPY"]
    # Only the pyproject files (and the helper that reads them) reach the dependency layer.
    assert all(src.split()[0].endswith(("pyproject.toml", "third_party_requirements.py")) for src in copied), copied
    assert any("pip install" in rest and "-r requirements.txt" in rest for instr, rest in deps if instr == "RUN")
    build_runs = " ".join(rest for instr, rest in stages["build"] if instr == "RUN")
    assert "--no-deps ./kernels ./client ./server" in build_runs and "pip check" in build_runs
    assert ("COPY", "--from=build /opt/lossd /opt/lossd") in stages["runtime"]
    assert not any(instr == "COPY" and rest.split()[0] in ("kernels", "client", "server") for instr, rest in stages["runtime"])


def test_dockerfile_variants_pick_the_torch_build() -> None:
    deps = _stages(_dockerfile())["deps"]
    assert ("ARG", "VARIANT=cpu") in deps and ("ARG", "TORCH_VERSION=2.13.0") in deps
    torch_install = next(rest for instr, rest in deps if instr == "RUN" and "torch==$TORCH_VERSION" in rest)
    cpu, cuda = (torch_install.split(f"{variant})")[1].split(";;")[0] for variant in ("cpu", "cuda"))
    assert '--index-url "$TORCH_CPU_INDEX_URL"' in cpu, "the CPU image must not pull the CUDA wheel"
    assert "--index-url" not in cuda, "the CUDA image uses the default wheel, which carries the CUDA runtime"
    assert "exit 1" in torch_install, "an unknown VARIANT must fail the build"
    url = next(rest.split("=", 1)[1] for instr, rest in deps if instr == "ARG" and rest.startswith("TORCH_CPU_INDEX_URL="))
    assert url.endswith("/whl/cpu")


def test_dockerfile_runtime_is_non_root_labelled_and_health_checked() -> None:
    runtime = _stages(_dockerfile())["runtime"]
    users = [rest for instr, rest in runtime if instr == "USER"]
    assert users == ["10001:0"], "a numeric non-root UID with group 0 (arbitrary-UID platforms run with gid 0)"
    setup = " ".join(rest for instr, rest in runtime if instr == "RUN")
    assert "--uid 10001 --gid 0" in setup and "chgrp -R 0 /var/lib/lossd" in setup and "chmod -R g=u /var/lib/lossd" in setup
    labels = " ".join(rest for instr, rest in runtime if instr == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    exposed = " ".join(rest for instr, rest in runtime if instr == "EXPOSE").split()
    assert set(exposed) == {"50051", "8000"}
    assert ("ENTRYPOINT", '["lossd"]') in runtime and ("CMD", '["serve"]') in runtime
    health = [rest for instr, rest in runtime if instr == "HEALTHCHECK"]
    assert len(health) == 1 and "/usr/local/lib/lossd-docker/healthcheck.py" in health[0]
    assert ("COPY", "deploy/docker/healthcheck.py /usr/local/lib/lossd-docker/healthcheck.py") in runtime
    for instr, rest in _dockerfile():
        if instr == "COPY" and not rest.startswith("--from"):
            assert (ROOT / rest.split()[0]).exists(), f"Dockerfile copies {rest.split()[0]}, which does not exist"


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for excluded in (".venv", "**/.venv", ".git", "artifacts", "tests", "bench", "**/__pycache__", "deploy/certs"):
        assert excluded in patterns, f".dockerignore must exclude {excluded}"
    copied = {rest.split()[0].split("/")[0] for instr, rest in _dockerfile() if instr == "COPY" and not rest.startswith("--from")}
    copied_paths = {rest.split()[0] for instr, rest in _dockerfile() if instr == "COPY" and not rest.startswith("--from")}
    assert copied == {"kernels", "client", "server", "deploy"}
    for path in copied_paths:
        assert not any(path == pattern or path.startswith(pattern.rstrip("/") + "/") for pattern in patterns), f"{path} is excluded"


def test_compose_stack_references_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"lossd-1", "lossd-2", "nginx", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (ROOT / host).exists(), f"{name} mounts {host}, which does not exist"
            else:
                assert host in compose.get("volumes", {}), f"{name} mounts the undeclared volume {host}"
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for replica in ("lossd-1", "lossd-2"):
        assert services[replica]["environment"]["LOSSD_HOST"] == "0.0.0.0"
        assert services[replica]["healthcheck"]["test"][-1].count("/readyz") == 1


def test_prometheus_config_scrapes_the_replicas() -> None:
    path = ROOT / "deploy/prometheus/prometheus.yml"
    if not path.exists():
        pytest.fail("deploy/prometheus/prometheus.yml is missing")
    config = yaml.safe_load(path.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert any("lossd-1" in t for t in targets) and any("lossd-2" in t for t in targets), targets


def _datasource_refs(node: object, where: str = "") -> list[tuple[str, object]]:
    """Every ``datasource`` value in the dashboard, with where it is."""
    found: list[tuple[str, object]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append((where, value))
            found += _datasource_refs(value, f"{where}/{node.get('title', node.get('name', key))}")
    elif isinstance(node, list):
        for item in node:
            found += _datasource_refs(item, where)
    return found


def test_grafana_dashboard_is_importable_into_any_grafana() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/lossd.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"], name
    assert "$job" in variables["instance"]["query"]["query"], "instance choices follow the chosen job"
    refs = _datasource_refs(dashboard["panels"]) + _datasource_refs(dashboard["templating"]["list"])
    assert len(refs) >= 15
    for where, ref in refs:
        assert isinstance(ref, dict) and ref.get("uid") == "${datasource}", f"{where} hard-codes datasource {ref!r}"
    # The service panels read per-replica series and follow the job/instance choice.
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    service = [expr for expr in exprs if "model_dataset_split" not in expr]
    assert len(service) >= 6
    for expr in service:
        assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, expr


def test_compose_gpu_override_reserves_one_gpu_per_replica() -> None:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert set(gpu) == {"lossd-1", "lossd-2"} <= set(base)
    assert base["lossd-1"]["build"]["args"]["VARIANT"] == "cpu" and "deploy" not in base["lossd-1"]
    device_ids = []
    for name, service in gpu.items():
        assert service["build"]["args"]["VARIANT"] == "cuda", name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        device_ids += device["device_ids"]
    assert len(device_ids) == len(set(device_ids)) == 2, f"each replica gets its own GPU: {device_ids}"


def test_compose_alertmanager_and_persistent_volumes() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    assert "alertmanager" in services and "alertmanager" in services["prometheus"]["depends_on"]
    for service, path in (("prometheus", "/prometheus"), ("alertmanager", "/alertmanager"), ("grafana", "/var/lib/grafana")):
        named = [v.split(":")[0] for v in services[service]["volumes"] if v.split(":")[1] == path]
        assert named and named[0] in volumes, f"{service} keeps {path} in a named volume"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for am in prometheus["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"]
    alertmanager = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"] for r in alertmanager["receivers"]}
    assert alertmanager["route"]["receiver"] in receivers
    assert all(route["receiver"] in receivers for route in alertmanager["route"].get("routes", []))


def test_dockerfile_stages_declare_the_build_args_they_use() -> None:
    """An ARG from before the first FROM is empty inside a stage unless the stage declares it again."""
    for name, stage in _stages(_dockerfile()).items():
        if not name:
            continue
        declared = {rest.split("=")[0] for instr, rest in stage if instr in ("ARG", "ENV")}
        declared |= {word.split("=")[0] for instr, rest in stage if instr == "ENV" for word in rest.split()}
        for instr, rest in stage:
            if instr in ("LABEL", "RUN", "ENV"):
                used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", rest)) - {"PATH"}
                assert used <= declared, f"stage {name}: {instr} uses {sorted(used - declared)} without declaring them"


def test_alertmanager_config_passes_amtool() -> None:
    result = subprocess.run(
        [require_binary("amtool"), "check-config", str(ROOT / "deploy/alertmanager/alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_prometheus_config_passes_promtool_and_scrapes_over_tls_with_a_token(tmp_path: Path) -> None:
    """promtool checks deploy/prometheus/prometheus.yml with /certs pointing at files scripts/gen_certs.py wrote."""
    import sys

    promtool = require_binary("promtool")
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["scheme"] == "https" and job["tls_config"]["ca_file"] == "/certs/ca.pem", job
    assert job["authorization"]["credentials_file"] == "/certs/prometheus-token", job
    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_certs.py"), "--out", str(certs), "--days", "1"], check=True, capture_output=True
    )
    assert "prometheus:" in (certs / "tokens").read_text()  # the token Prometheus sends is one the replicas accept
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text().replace("/certs/", f"{certs}/")
    (tmp_path / "prometheus.yml").write_text(text)
    (tmp_path / "rules").symlink_to(ROOT / "deploy/prometheus/rules")
    check = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
