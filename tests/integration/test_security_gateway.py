"""The standalone gateway (``LOSSD_BACKENDS``) in front of two real backends that require mutual TLS and tokens.

Backends and gateways are ``lossd serve`` processes; certificates come from
``scripts/gen_certs.py`` at test time. The gateway either forwards each
caller's ``Authorization`` header or sends its own token (``backend_token_file``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from integration.lossd_process import LossdProcess

from helpers import assert_close
from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.server.gateway.backends import BackendPool
from lossd.server.security import InsecureBindError
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
BACKEND_TOKEN, FRONT_TOKEN = "backend-5e2a9c0d7b1f4e8a", "front-9d4b1a7e3c0f6b2d"
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]], dtype=np.float32)
LABELS = np.array([0, 2, 1], dtype=np.int64)
BODY = {
    "tensors": {
        "logits": {"dtype": "float32", "shape": [3, 3], "data": LOGITS.tolist()},
        "labels": {"dtype": "int64", "shape": [3], "data": LABELS.tolist()},
    },
    "functions": ["cross_entropy"],
}


def _reference_cross_entropy() -> float:
    z = LOGITS.astype(np.float64)
    log_softmax = z - z.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(LABELS)), LABELS].mean())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_certs.py"), "--out", str(out), "--days", "1"], check=True, capture_output=True)
    (out / "backend-tokens").write_text(f"gateway:{BACKEND_TOKEN}\n")
    (out / "front-tokens").write_text(f"front:{FRONT_TOKEN}\n")
    (out / "gateway-token").write_text(f"{BACKEND_TOKEN}\n")
    return out


@pytest.fixture(scope="module")
def backends(certs: Path) -> Iterator[list[LossdProcess]]:
    """Two backends: TLS, client certificates required, tokens of backend-tokens."""
    settings = {
        "tls_cert_file": certs / "server.pem",
        "tls_key_file": certs / "server-key.pem",
        "tls_client_ca_file": certs / "ca.pem",
        "auth_tokens_file": certs / "backend-tokens",
    }
    started = [LossdProcess(**settings), LossdProcess(**settings)]
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def _gateway(certs: Path, backends: list[LossdProcess], **settings: object) -> LossdProcess:
    return LossdProcess(backends=json.dumps([b.grpc_address for b in backends]), backend_tls_ca_file=certs / "ca.pem", **settings)


def _client_cert(certs: Path) -> dict[str, object]:
    return {"backend_tls_cert_file": certs / "client.pem", "backend_tls_key_file": certs / "client-key.pem"}


def _direct(certs: Path, backend: LossdProcess, token: str) -> float:
    """cross_entropy from one backend straight over gRPC (mutual TLS and the token)."""
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.pem").read_bytes(),
            private_key=(certs / "client-key.pem").read_bytes(),
            certificate_chain=(certs / "client.pem").read_bytes(),
        ),
        grpc.access_token_call_credentials(token),
    )
    request = pb.EvaluateRequest(
        tensors={"logits": encode_tensor(LOGITS, "logits"), "labels": encode_tensor(LABELS, "labels")},
        functions=[spec_to_proto("cross_entropy")],
    )
    with grpc.secure_channel(backend.grpc_address, credentials) as channel:
        return float(pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30).results[0].values["value"])


def _evaluate(gateway: LossdProcess, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{gateway.url}/v1/evaluate", json=BODY, headers=headers, timeout=30)


def test_the_gateway_forwards_the_callers_token_over_mutual_tls(certs: Path, backends: list[LossdProcess]) -> None:
    direct = _direct(certs, backends[0], BACKEND_TOKEN)
    assert_close(direct, _reference_cross_entropy(), rtol=2e-6, what="cross_entropy, direct")
    # The gateway checks no tokens itself: what the backends accept is the caller's forwarded header.
    with _gateway(certs, backends, **_client_cert(certs)) as gateway:
        answers = [_evaluate(gateway, BACKEND_TOKEN) for _ in range(4)]  # round robin: both backends answer
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"]["cross_entropy"] == pytest.approx(direct, rel=1e-7)
        refused = _evaluate(gateway, None)
        assert refused.status_code == 401, refused.text
        assert _evaluate(gateway, FRONT_TOKEN).status_code == 401  # a token the backends do not know
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).json()["backends"] == {b.grpc_address: "SERVING" for b in backends}


def test_the_gateway_sends_its_own_token_in_place_of_the_callers(certs: Path, backends: list[LossdProcess]) -> None:
    direct = _direct(certs, backends[1], BACKEND_TOKEN)
    gateway_settings = {
        **_client_cert(certs),
        "auth_tokens_file": certs / "front-tokens",  # callers hold front tokens, unknown to the backends
        "backend_token_file": certs / "gateway-token",
    }
    with _gateway(certs, backends, **gateway_settings) as gateway:
        for _ in range(4):
            answer = _evaluate(gateway, FRONT_TOKEN)
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"]["cross_entropy"] == pytest.approx(direct, rel=1e-7)
        assert _evaluate(gateway, None).status_code == 401  # the gateway's own check
        assert _evaluate(gateway, BACKEND_TOKEN).status_code == 401  # not a front token


def test_a_gateway_without_the_client_certificate_is_refused_by_the_backends(certs: Path, backends: list[LossdProcess]) -> None:
    with _gateway(certs, backends) as gateway:
        answer = _evaluate(gateway, BACKEND_TOKEN)
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")


def test_tokens_are_never_sent_in_clear_text_to_a_backend_off_this_machine(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"front:{FRONT_TOKEN}\n")
    remote = ["10.1.2.3:50051"]
    with pytest.raises(InsecureBindError, match="refusing to send bearer tokens in clear text to the backend 10.1.2.3:50051"):
        BackendPool(remote, Settings(backends=remote, auth_tokens_file=tokens))
    BackendPool(remote, Settings(backends=remote, auth_tokens_file=tokens, allow_insecure=True))  # the explicit way out
    BackendPool(remote, Settings(backends=remote, auth_tokens_file=tokens, backend_tls=True))
    BackendPool(["127.0.0.1:50051"], Settings(backends=["127.0.0.1:50051"], auth_tokens_file=tokens))  # loopback stays open
