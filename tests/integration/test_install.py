"""The install paths as a user takes them: wheels of the three distributions, each installed into a fresh venv.

The wheels are built with ``python -m build`` from copies of the source folders (the tree stays
clean). ``lossd-client`` is then installed alone into a fresh virtual environment, its
dependencies (numpy, grpcio, protobuf, ...) from the package index, no torch, and its ``lossd``
command evaluates a batch on a real server that runs from the project's environment.

``lossd-kernels`` and ``lossd-server`` share one more fresh environment, because each torch
install costs about a minute here: torch==2.13.0 first and pinned (as the Makefile does: the
CPU build, never an unpinned resolve that pulls the CUDA one), then the kernels wheel alone,
whose in-process ``evaluate`` and installed set are recorded; then lossd-kernels is uninstalled
and the server wheel installed, so that pip resolves lossd-kernels and lossd-client from the
server's requirements. That ``lossd serve`` runs as its own process on port 0, answers the gRPC
health service and an evaluation, and exits cleanly on SIGTERM. Every value is checked against
torch, computed here in the test process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {"kernels": "lossd_kernels", "client": "lossd_client", "server": "lossd_server"}
TORCH = "torch==2.13.0"  # the Makefile's pin: pip reuses this machine's CPU build
ANNOUNCE = re.compile(r"lossd serving gRPC on (\S+?), HTTP on (\S+)")
KERNELS_PROBE = """
import importlib.util, json, sys
import numpy as np
import lossd.kernels
batch = np.load(sys.argv[1])
out = lossd.kernels.evaluate({"logits": batch["logits"], "labels": batch["labels"]}, ["cross_entropy"])
print(json.dumps({
    "cross_entropy": out["cross_entropy"].value,
    "kernels_file": lossd.kernels.__file__,
    "grpc_importable": importlib.util.find_spec("grpc") is not None,
    "grpc_imported": any(name.split(".")[0] == "grpc" for name in sys.modules),
}))
"""


def _run(
    command: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment at ``path`` (its python): nothing in it but the standard library.

    Without pip of its own: installing pip into each venv (ensurepip) took 5-25 s here. The
    project's pip installs into it with ``--python``, running with the venv's interpreter and
    importing nothing else from the project's environment.
    """
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], timeout=120)
    return path / "bin/python"


def _pip(python: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``pip ARGS`` for the environment of ``python``.

    Installs skip byte-compiling (torch's ~15,000 files): imports compile what they use.
    """
    install = ["--quiet", "--no-compile"] if args[0] == "install" else []
    return _run([sys.executable, "-m", "pip", "--python", str(python), args[0], *install, *args[1:]], timeout=timeout)


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three wheels, built by ``python -m build --wheel`` from copies of kernels/, client/ and server/.

    ``--no-isolation``: build checks that this environment meets each build-system requirement
    (setuptools>=68) instead of installing setuptools into three throw-away venvs (40-60 s here).
    """
    out = tmp_path_factory.mktemp("wheels")
    sources = tmp_path_factory.mktemp("sources")
    built = {}
    for folder, stem in DISTRIBUTIONS.items():
        source = shutil.copytree(
            ROOT / folder, sources / folder, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
        )
        _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)], timeout=300)
        (built[folder],) = out.glob(f"{stem}-*.whl")
    return built


@pytest.fixture(scope="module")
def client_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the lossd-client wheel alone (and what it depends on)."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    python = _fresh_venv(venv)
    _pip(python, "install", "--find-links", str(wheels["client"].parent), str(wheels["client"]), timeout=600)
    return venv


def _clean_env(**settings: str) -> dict[str, str]:
    """The test process's environment without its LOSSD_* settings, plus ``settings``."""
    return {key: value for key, value in os.environ.items() if not key.startswith("LOSSD_")} | settings


def _batch(path: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((64, 7)) * 3).astype(np.float32)
    labels = rng.integers(0, 7, 64)
    np.savez(path, logits=logits, labels=labels)
    return logits, labels


def _installed(python: Path) -> set[str]:
    listed = json.loads(_pip(python, "list", "--format", "json").stdout)
    return {item["name"].lower().replace("_", "-") for item in listed}


@dataclass
class KernelsAlone:
    """What the fresh environment held and computed with lossd-kernels (and torch) alone."""

    installed: set[str]
    probe: dict[str, Any]
    logits: np.ndarray
    labels: np.ndarray


@dataclass
class ServerVenv:
    """The fresh environment: first lossd-kernels alone (recorded), then lossd-server."""

    venv: Path
    kernels_alone: KernelsAlone
    resolved: dict[str, str]  # what pip installed for the server wheel: name -> where from


@pytest.fixture(scope="module")
def server_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ServerVenv:
    """One fresh venv: torch pinned, lossd-kernels alone (recorded), then lossd-server from its wheel."""
    root = tmp_path_factory.mktemp("server-venv")
    venv = root / "venv"
    python = _fresh_venv(venv)
    wheel_dir = str(wheels["kernels"].parent)
    _pip(python, "install", TORCH, timeout=900)  # first and pinned, as the Makefile: never an unpinned resolve
    _pip(python, "install", "--find-links", wheel_dir, str(wheels["kernels"]))
    logits, labels = _batch(root / "batch.npz", seed=5)
    probe_run = _run([str(python), "-c", KERNELS_PROBE, str(root / "batch.npz")], timeout=300, env=_clean_env(), cwd=root)
    kernels_alone = KernelsAlone(_installed(python), json.loads(probe_run.stdout), logits, labels)
    # Uninstalled again, so that the server wheel's requirements are what brings lossd-kernels back.
    _pip(python, "uninstall", "--yes", "--quiet", "lossd-kernels")
    report = root / "server-install.json"
    _pip(python, "install", "--find-links", wheel_dir, "--report", str(report), str(wheels["server"]), timeout=900)
    _pip(python, "check")
    resolved = {item["metadata"]["name"].lower(): item["download_info"]["url"] for item in json.loads(report.read_text())["install"]}
    return ServerVenv(venv, kernels_alone, resolved)


def test_wheels_pin_each_other_and_share_the_grpcio_floor(wheels: dict[str, Path]) -> None:
    server, client, kernels = (_requires(wheels[name]) for name in ("server", "client", "kernels"))
    assert "lossd-kernels~=0.1.0" in server and "lossd-client~=0.1.0" in server
    torch_requirement = next(r for r in kernels if r.startswith("torch"))
    assert "==" not in torch_requirement and "<" in torch_requirement, f"torch is a tested range, not a pin: {torch_requirement}"
    assert not any(r.startswith("torch") for r in client + server), "only lossd-kernels brings torch"
    floors = {r for r in client + server if r.split(">=")[0] in ("grpcio", "grpcio-status", "grpcio-health-checking", "grpcio-reflection")}
    assert {r.split(">=")[1] for r in floors} == {"1.85.1"}, floors


def test_client_alone_imports_without_torch(client_venv: Path) -> None:
    python = str(client_venv / "bin/python")
    probe = "import sys, lossd.client; assert 'torch' not in sys.modules, 'lossd.client imported torch'; print(lossd.client.__file__)"
    imported = _run([python, "-c", probe], timeout=120).stdout
    assert str(client_venv) in imported, f"lossd.client came from {imported!r}, not the fresh environment"
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, "torch must not be installed with lossd-client"
    _pip(client_venv / "bin/python", "check")


def test_client_alone_runs_lossd_eval_against_a_server(client_venv: Path, address: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((40, 5)) * 2).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    batch = tmp_path / "batch.npz"
    np.savez(batch, logits=logits, labels=labels)
    lossd = str(client_venv / "bin/lossd")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOSSD_")}
    result = _run(
        [lossd, "eval", "--server", address, "--inputs", str(batch), "--fn", "cross_entropy", "--fn", "accuracy", "--json"],
        timeout=120,
        env=env,
    )
    values = json.loads(result.stdout)["results"]
    expected_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    assert values["cross_entropy"] == pytest.approx(expected_loss, rel=1e-6)
    assert values["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()), abs=1e-12)
    version = _run([lossd, "--version"], timeout=60, env=env).stdout
    assert "lossd-client 0.1.0" in version and "lossd-server" not in version
    serve = subprocess.run([lossd, "serve"], capture_output=True, text=True, timeout=60, env=env)
    assert serve.returncode == 2 and "lossd-server" in serve.stderr, serve.stderr


@pytest.mark.timeout(1200)  # the fixture's fresh torch install: about a minute, several on a loaded machine
def test_kernels_alone_evaluate_in_process_without_grpc(server_venv: ServerVenv) -> None:
    alone = server_venv.kernels_alone
    assert str(server_venv.venv) in alone.probe["kernels_file"], f"lossd.kernels came from {alone.probe['kernels_file']}"
    expected = float(F.cross_entropy(torch.from_numpy(alone.logits).double(), torch.from_numpy(alone.labels)))
    assert alone.probe["cross_entropy"] == pytest.approx(expected, rel=1e-6)
    assert {"lossd-kernels", "torch", "numpy"} <= alone.installed
    brought = {name for name in alone.installed if name.startswith(("grpcio", "protobuf", "lossd-client", "lossd-server"))}
    assert not brought, f"lossd-kernels alone must not bring the gRPC stack: {brought}"
    assert not alone.probe["grpc_importable"] and not alone.probe["grpc_imported"]


@pytest.mark.timeout(1200)
def test_server_wheel_pulls_kernels_and_client_and_serves(server_venv: ServerVenv, wheels: dict[str, Path], tmp_path: Path) -> None:
    for folder in ("kernels", "client", "server"):
        name = f"lossd-{folder}"
        assert server_venv.resolved.get(name) == wheels[folder].as_uri(), (
            f"{name}: {server_venv.resolved.get(name)}, not the wheel built here"
        )
    assert "torch" not in server_venv.resolved, "the pinned torch stays: lossd-kernels accepts it"
    lossd = str(server_venv.venv / "bin/lossd")
    versions = _run([lossd, "--version"], timeout=60, env=_clean_env()).stdout
    assert all(f"{name} 0.1.0" in versions for name in ("lossd-client", "lossd-server", "lossd-kernels")), versions
    env = _clean_env(LOSSD_GRPC_PORT="0", LOSSD_HTTP_PORT="0", LOSSD_DEVICE="cpu", LOSSD_DRAIN_SECONDS="0.5", LOSSD_GRACE_SECONDS="2")
    stderr = (tmp_path / "serve.err").open("w+")  # a file: a pipe nobody reads could fill and block the server
    serve = subprocess.Popen([lossd, "serve"], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert serve.stdout is not None
        announced = ANNOUNCE.search(serve.stdout.readline())  # printed once both ports are bound
        assert announced, f"lossd serve did not announce itself: {serve.poll()}"
        address = announced.group(1)
        assert not address.endswith(":0"), "port 0 must be announced as the port bound"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "lossd.v1.LossService"):
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        logits, labels = _batch(tmp_path / "batch.npz", seed=5)
        command = [lossd, "eval", "--server", address, "--inputs", str(tmp_path / "batch.npz"), "--fn", "cross_entropy", "--json"]
        served = json.loads(_run(command, timeout=120, env=_clean_env()).stdout)["results"]["cross_entropy"]
        expected = float(F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels)))
        assert served == pytest.approx(expected, rel=1e-6)
        assert served == pytest.approx(server_venv.kernels_alone.probe["cross_entropy"], rel=1e-12), "in-process and served agree"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, "SIGTERM must drain and exit 0"
        stderr.seek(0)
        log = stderr.read()
        assert "Traceback" not in log, log[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)
        if serve.stdout is not None:
            serve.stdout.close()
        stderr.close()
