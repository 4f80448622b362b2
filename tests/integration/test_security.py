"""TLS, mutual TLS and bearer tokens on both ports of a real ``lossd serve`` (a subprocess), certificates made at test time.

Certificates come from ``scripts/gen_certs.py`` (the ``cryptography`` package),
run twice: the second CA signs a client certificate the server must refuse.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.client import Client
from lossd.client.errors import UnauthenticatedError, UnavailableError
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
LOSSD = [sys.executable, "-m", "lossd.server"]
KEEP, GONE = "keep-8c1f0e5a9d2b4c7e", "gone-3b6d9a0f1e4c7b2a"
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]], dtype=np.float32)
LABELS = np.array([0, 2, 1], dtype=np.int64)
BODY = {
    "tensors": {
        "logits": {"dtype": "float32", "shape": [3, 3], "data": LOGITS.tolist()},
        "labels": {"dtype": "int64", "shape": [3], "data": LABELS.tolist()},
    },
    "functions": ["cross_entropy"],
}


def _certs(out: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_certs.py"), "--out", str(out), "--days", "1"], check=True, capture_output=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running ``lossd serve`` with the files it was given."""

    process: subprocess.Popen[str]
    grpc_port: int
    http_port: int
    certs: Path
    tokens: Path

    @property
    def grpc_address(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"https://localhost:{self.http_port}"

    def https(self, *, token: str | None = None, client_cert: Path | None = None) -> httpx.Client:
        context = ssl.create_default_context(cafile=self.certs / "ca.pem")
        if client_cert is not None:
            context.load_cert_chain(client_cert / "client.pem", client_cert / "client-key.pem")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=context, headers=headers, timeout=30)

    def channel_credentials(self, client_cert: Path | None = None) -> grpc.ChannelCredentials:
        pair = {}
        if client_cert is not None:
            pair = {
                "private_key": (client_cert / "client-key.pem").read_bytes(),
                "certificate_chain": (client_cert / "client.pem").read_bytes(),
            }
        return grpc.ssl_channel_credentials(root_certificates=(self.certs / "ca.pem").read_bytes(), **pair)

    def client(self, *, token: str | None, client_cert: Path | None = None) -> Client:
        credentials = self.channel_credentials(client_cert)
        if token is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return Client(self.grpc_address, credentials=credentials, attempts=1, timeout=20)


def _serve(tmp: Path, certs: Path, **env: str) -> Iterator[Served]:
    tokens = tmp / "tokens"
    tokens.write_text(f"# test tokens\n\nkeeper:{KEEP}\ngoner:{GONE}\n")
    grpc_port, http_port = _free_port(), _free_port()
    environ = {
        **os.environ,
        "LOSSD_DEVICE": "cpu",
        "LOSSD_GRPC_PORT": str(grpc_port),
        "LOSSD_HTTP_PORT": str(http_port),
        "LOSSD_TLS_CERT_FILE": str(certs / "server.pem"),
        "LOSSD_TLS_KEY_FILE": str(certs / "server-key.pem"),
        "LOSSD_AUTH_TOKENS_FILE": str(tokens),
        "LOSSD_LOG_LEVEL": "warning",
        **env,
    }
    process = subprocess.Popen([*LOSSD, "serve"], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = Served(process, grpc_port, http_port, certs, tokens)
    try:
        _wait_ready(served)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def _wait_ready(served: Served) -> None:
    deadline = time.monotonic() + 90
    while served.process.poll() is None:
        try:
            with served.https(client_cert=served.certs) as http:  # a server without a client CA ignores it
                if http.get("/readyz").status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "lossd serve did not get ready"
        time.sleep(0.2)
    raise AssertionError(f"lossd serve exited with {served.process.returncode}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates of another CA: its client certificate is not trusted."""
    return _certs(tmp_path_factory.mktemp("stranger"))


@pytest.fixture(scope="module")
def tls_tokens(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Served]:
    """TLS and tokens; /metrics private (the default)."""
    yield from _serve(tmp_path_factory.mktemp("tls"), certs)


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Served]:
    """Mutual TLS and tokens, /metrics public."""
    yield from _serve(tmp_path_factory.mktemp("mtls"), certs, LOSSD_TLS_CLIENT_CA_FILE=str(certs / "ca.pem"), LOSSD_METRICS_PUBLIC="true")


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


# -- TLS and tokens ----------------------------------------------------------------------------


def test_plaintext_clients_are_refused_on_both_ports(tls_tokens: Served) -> None:
    with grpc.insecure_channel(tls_tokens.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert _code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{tls_tokens.http_port}/healthz", timeout=5)


def test_tls_without_a_token_is_unauthenticated_on_both_ports(tls_tokens: Served) -> None:
    with grpc.secure_channel(tls_tokens.grpc_address, tls_tokens.channel_credentials()) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListFunctions(pb.ListFunctionsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("www-authenticate", 'Bearer realm="lossd"') in info.value.trailing_metadata()  # type: ignore[attr-defined]
        wrong = (("authorization", "Bearer not-a-token"),)
        assert _code(lambda: stub.ListFunctions(pb.ListFunctionsRequest(), timeout=10, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED
        basic = (("authorization", "Basic a2VlcDp4"),)
        assert _code(lambda: stub.ListFunctions(pb.ListFunctionsRequest(), timeout=10, metadata=basic)) == grpc.StatusCode.UNAUTHENTICATED
    with tls_tokens.https() as http:
        response = http.post("/v1/evaluate", json=BODY)
        assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == 'Bearer realm="lossd"'
        assert response.json()["type"] == "urn:lossd:problem:unauthenticated"
        unknown = http.get("/v1/functions", headers={"authorization": "Bearer nope"})
        assert unknown.status_code == 401 and "invalid_token" in unknown.headers["www-authenticate"]


def test_tls_with_a_token_matches_an_unsecured_server(tls_tokens: Served, address: str) -> None:
    with Client(address) as plain, tls_tokens.client(token=KEEP) as secured:
        expected = plain.evaluate({"logits": LOGITS, "labels": LABELS}, ["cross_entropy", "ece"])
        got = secured.evaluate({"logits": LOGITS, "labels": LABELS}, ["cross_entropy", "ece"])
        for name in ("cross_entropy", "ece"):
            np.testing.assert_array_equal(np.asarray(got[name].value), np.asarray(expected[name].value))
    with tls_tokens.https(token=KEEP) as http:
        response = http.post("/v1/evaluate", json=BODY)
        assert response.status_code == 200, response.text
        value = response.json()["results"]["cross_entropy"]
        np.testing.assert_allclose(value, float(np.asarray(expected["cross_entropy"].value)), rtol=1e-6)
        assert http.get("/v1/functions").status_code == 200


def test_health_stays_open_and_metrics_need_a_token(tls_tokens: Served) -> None:
    with grpc.secure_channel(tls_tokens.grpc_address, tls_tokens.channel_credentials()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with tls_tokens.https() as http:
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        for path in ("/metrics", "/dashboard", "/v1/history"):
            assert http.get(path).status_code == 401, path
    with tls_tokens.https(token=KEEP) as http:
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
        assert 'lossd_auth_refused_total{reason="missing",transport="grpc"}' in text
        assert 'lossd_auth_refused_total{reason="unknown_token",transport="http"}' in text
        assert KEEP not in text and GONE not in text


def test_security_headers_and_json_only_posts(tls_tokens: Served) -> None:
    with tls_tokens.https(token=KEEP) as http:
        for path in ("/healthz", "/v1/functions", "/nope"):
            headers = http.get(path).headers
            assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
            assert "default-src 'self'" in headers["content-security-policy"] and headers["referrer-policy"] == "no-referrer"
        assert http.get("/v1/functions").headers["cache-control"] == "no-store"
        form = http.post("/v1/evaluate", content=b'{"tensors": {}}', headers={"content-type": "text/plain"})
        assert form.status_code == 415 and form.json()["type"] == "urn:lossd:problem:unsupported-media-type"
        assert "access-control-allow-origin" not in http.get("/v1/functions", headers={"origin": "https://evil.example"}).headers


def test_a_removed_token_stops_working_after_reload(tls_tokens: Served) -> None:
    with tls_tokens.client(token=GONE) as client:
        assert client.list_functions()
        tls_tokens.tokens.write_text(f"keeper:{KEEP}\n")
        tls_tokens.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.list_functions()
            except UnauthenticatedError:
                break
            assert time.monotonic() < deadline, "the removed token still works"
            time.sleep(0.2)
    with tls_tokens.https(token=GONE) as http:
        assert http.get("/v1/functions").status_code == 401
    with tls_tokens.https(token=KEEP) as http, tls_tokens.client(token=KEEP) as client:
        assert http.get("/v1/functions").status_code == 200 and client.list_functions()


# -- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(mutual: Served, stranger: Path) -> None:
    for cert in (None, stranger):
        with mutual.client(token=KEEP, client_cert=cert) as client, pytest.raises(UnavailableError):
            client.list_functions()  # the handshake fails: no call reaches the server
        with pytest.raises(httpx.HTTPError), mutual.https(token=KEEP, client_cert=cert) as http:
            http.get("/healthz")


def test_mutual_tls_accepts_a_certificate_signed_by_the_client_ca(mutual: Served) -> None:
    with mutual.client(token=KEEP, client_cert=mutual.certs) as client:
        assert client.list_functions()
    with mutual.https(token=KEEP, client_cert=mutual.certs) as http:
        assert http.post("/v1/evaluate", json=BODY).status_code == 200
    with mutual.https(client_cert=mutual.certs) as http:  # a certificate, but no token: the API still wants one
        assert http.get("/v1/functions").status_code == 401
        assert http.get("/metrics").status_code == 200  # metrics_public
        assert http.get("/dashboard").status_code == 200


# -- safe by default ---------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {"LOSSD_TLS_CERT_FILE": "x.pem", "LOSSD_TLS_KEY_FILE": "x-key.pem"}])
def test_an_open_public_bind_refuses_to_start(env: dict[str, str]) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")} | env
    start = time.monotonic()
    result = subprocess.run([*LOSSD, "serve", "--host", "0.0.0.0"], env=environ, capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LOSSD_ALLOW_INSECURE=true" in lines[0] and "0.0.0.0" in lines[0], result.stderr
    assert elapsed < 5, f"took {elapsed:.1f}s"
