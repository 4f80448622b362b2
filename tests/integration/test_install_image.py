"""What the Dockerfile does, run as local processes (no Docker engine here).

The image's dependency layer is the output of deploy/docker/third_party_requirements.py over
the three pyproject files, and the lossd distributions go in with ``--no-deps`` on top: the
layer must hold every third-party requirement of the installed distributions. The image's
HEALTHCHECK (deploy/docker/healthcheck.py) asks a real server's gRPC health service, in
plaintext, over TLS and over mutual TLS; and the image's entrypoint, ``lossd serve`` with the
image's settings (TLS and tokens as the compose stack and the chart mount them), starts,
answers the health check and stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import distribution
from pathlib import Path

import pytest
from integration.conftest import ServerThread, start_server
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK = ROOT / "deploy/docker/healthcheck.py"
PYPROJECTS = [ROOT / f"{name}/pyproject.toml" for name in ("kernels", "client", "server")]


def _health(port: int, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LOSSD_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30, env={**clean, "LOSSD_GRPC_PORT": str(port), **env}
    )


def _port(server: ServerThread) -> int:
    return int(server.address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_certs.py"), "--out", str(out), "--days", "1"], check=True, capture_output=True)
    return out


def test_dependency_layer_holds_every_third_party_requirement() -> None:
    printed = subprocess.run(
        [sys.executable, str(ROOT / "deploy/docker/third_party_requirements.py"), *map(str, PYPROJECTS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split("\n")
    layer = {Requirement(line).name.lower().replace("_", "-"): Requirement(line) for line in printed if line}
    assert "torch" in layer and not any(name.startswith("lossd") for name in layer)
    for name in ("lossd-kernels", "lossd-client", "lossd-server"):
        for text in distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra (lossd-kernels[triton]) is not part of the image
            key = requirement.name.lower().replace("_", "-")
            if key.startswith("lossd-"):
                continue
            assert key in layer, f"{name} needs {requirement}, which the image's dependency layer does not install"
            assert layer[key].specifier == requirement.specifier, f"{name}: {requirement} vs the layer's {layer[key]}"


def test_healthcheck_plaintext_serving_and_stopped() -> None:
    server = start_server()
    port = _port(server)
    try:
        result = _health(port)
        assert result.returncode == 0, result.stderr
    finally:
        server.stop()
    stopped = _health(port)
    assert stopped.returncode == 1 and f"127.0.0.1:{port}" in stopped.stderr


def test_healthcheck_over_tls_checks_the_server_certificate(certs: Path) -> None:
    server = start_server(tls_cert_file=certs / "server.pem", tls_key_file=certs / "server-key.pem")
    port = _port(server)
    tls = {"LOSSD_TLS_CERT_FILE": str(certs / "server.pem")}
    try:
        trusted = _health(port, **tls, LOSSD_HEALTHCHECK_CA_FILE=str(certs / "ca.pem"))
        assert trusted.returncode == 0, trusted.stderr
        # The server's own certificate is no CA: the handshake must fail, not fall back to plaintext.
        untrusted = _health(port, **tls, LOSSD_HEALTHCHECK_CA_FILE=str(certs / "client.pem"))
        assert untrusted.returncode == 1
        plaintext = _health(port)
        assert plaintext.returncode == 1
    finally:
        server.stop()


def test_healthcheck_presents_a_client_certificate_under_mutual_tls(certs: Path) -> None:
    server = start_server(tls_cert_file=certs / "server.pem", tls_key_file=certs / "server-key.pem", tls_client_ca_file=certs / "ca.pem")
    port = _port(server)
    tls = {"LOSSD_TLS_CERT_FILE": str(certs / "server.pem"), "LOSSD_HEALTHCHECK_CA_FILE": str(certs / "ca.pem")}
    try:
        without = _health(port, **tls)
        assert without.returncode == 1
        client = {
            "LOSSD_HEALTHCHECK_CLIENT_CERT_FILE": str(certs / "client.pem"),
            "LOSSD_HEALTHCHECK_CLIENT_KEY_FILE": str(certs / "client-key.pem"),
        }
        with_cert = _health(port, **tls, **client)
        assert with_cert.returncode == 0, with_cert.stderr
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def entrypoint(certs: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """``lossd serve`` (the image's ENTRYPOINT and CMD) with the image's settings, bound to loopback here."""
    grpc_port, http_port = _free_port(), _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOSSD_")}
    env |= {
        "LOSSD_HOST": "127.0.0.1",
        "LOSSD_GRPC_PORT": str(grpc_port),
        "LOSSD_HTTP_PORT": str(http_port),
        "LOSSD_DEVICE": "cpu",
        "LOSSD_TLS_CERT_FILE": str(certs / "server.pem"),
        "LOSSD_TLS_KEY_FILE": str(certs / "server-key.pem"),
        "LOSSD_AUTH_TOKENS_FILE": str(certs / "tokens"),
        "LOSSD_HEALTHCHECK_CA_FILE": str(certs / "ca.pem"),
    }
    lossd = Path(sys.executable).parent / "lossd"
    command = [str(lossd)] if lossd.exists() else [sys.executable, "-m", "lossd.client.cli"]
    process = subprocess.Popen([*command, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process, env
    if process.poll() is None:
        process.kill()
        process.wait(30)
    if process.stdout is not None:
        process.stdout.close()


@pytest.mark.slow
def test_entrypoint_serves_answers_the_healthcheck_and_stops_on_sigterm(entrypoint: tuple[subprocess.Popen[str], dict[str, str]]) -> None:
    process, env = entrypoint
    deadline = time.monotonic() + 90
    while True:
        result = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30, env=env)
        if result.returncode == 0:
            break
        assert process.poll() is None, f"lossd serve exited {process.returncode}: {process.stdout.read() if process.stdout else ''}"
        assert time.monotonic() < deadline, f"no SERVING within 90 s: {result.stderr}"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
