"""The container artefacts, checked without a Docker engine: hadolint, structure, and the compose stack's references."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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


def test_dockerfile_structure() -> None:
    instructions = _dockerfile()
    assert instructions[0][0] == "FROM" and "python:3.11" in instructions[0][1]
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    assert "torch==2.13.0" in runs, "torch must be pinned"
    user = [rest for instr, rest in instructions if instr == "USER"]
    assert user and not user[-1].startswith("root") and not user[-1].startswith("0"), "the service must not run as root"
    exposed = " ".join(rest for instr, rest in instructions if instr == "EXPOSE").split()
    assert set(exposed) == {"50051", "8000"}
    assert ("ENTRYPOINT", '["lossd"]') in instructions and ("CMD", '["serve"]') in instructions
    assert any(instr == "HEALTHCHECK" and "/readyz" in rest for instr, rest in instructions)
    copied = [rest.split()[0] for instr, rest in instructions if instr == "COPY"]
    for path in copied:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"


def test_compose_stack_references_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"lossd-1", "lossd-2", "nginx", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            assert (ROOT / host).exists(), f"{name} mounts {host}, which does not exist"
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
