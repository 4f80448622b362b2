"""The install paths as a user takes them: wheels of the three distributions, and lossd-client alone.

The wheels are built with ``python -m build`` from copies of the source folders (the tree stays
clean). ``lossd-client`` is then installed alone into a fresh virtual environment, its
dependencies (numpy, grpcio, protobuf, ...) from the package index, no torch, and its ``lossd``
command evaluates a batch on a real server that runs from the project's environment. The values
are checked against torch, computed here in the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {"kernels": "lossd_kernels", "client": "lossd_client", "server": "lossd_server"}


def _run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three wheels, built by ``python -m build --wheel`` from copies of kernels/, client/ and server/."""
    out = tmp_path_factory.mktemp("wheels")
    sources = tmp_path_factory.mktemp("sources")
    built = {}
    for folder, stem in DISTRIBUTIONS.items():
        source = shutil.copytree(
            ROOT / folder, sources / folder, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
        )
        _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)], timeout=300)
        (built[folder],) = out.glob(f"{stem}-*.whl")
    return built


@pytest.fixture(scope="module")
def client_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the lossd-client wheel alone (and what it depends on)."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin/python"
    wheel_dir = wheels["client"].parent
    _run([str(python), "-m", "pip", "install", "--quiet", "--find-links", str(wheel_dir), str(wheels["client"])], timeout=600)
    return venv


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
    _run([python, "-m", "pip", "check"], timeout=120)


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
