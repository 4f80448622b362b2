"""deploy/nginx/nginx.conf with a real nginx: gRPC and HTTP balanced over two replicas, failover included."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import ROOT, free_port, wait_for
from replica import Replica

from helpers import require_binary
from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


class Nginx:
    """The repo's nginx.conf with the compose hostnames and ports replaced by loopback ones.

    With ``certs`` (a scripts/gen_certs.py folder) it runs as written, TLS on
    both sides; without, the TLS directives are taken out for plaintext replicas.
    """

    def __init__(self, binary: str, workdir: Path, replicas: list[Replica], certs: Path | None = None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.certs = certs
        conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
        for i, r in enumerate(replicas, start=1):
            host = r.url.split("://", 1)[1]
            conf = conf.replace(f"lossd-{i}:50051", r.grpc_address).replace(f"lossd-{i}:8000", host)
        if certs is not None:
            conf = conf.replace("/etc/nginx/certs/", f"{certs}/")
            conf = conf.replace("listen 50051 ssl http2;", f"listen 127.0.0.1:{self.grpc_port} ssl http2;")
            conf = conf.replace("listen 8080 ssl;", f"listen 127.0.0.1:{self.http_port} ssl;")
        else:
            tls_directives = ("ssl_", "grpc_ssl_", "proxy_ssl_")
            conf = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith(tls_directives))
            conf = conf.replace("grpcs://", "grpc://").replace("https://", "http://")
            conf = conf.replace("listen 50051 ssl http2;", f"listen 127.0.0.1:{self.grpc_port} http2;")
            conf = conf.replace("listen 8080 ssl;", f"listen 127.0.0.1:{self.http_port};")
        directives = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
        assert "lossd-" not in directives and "50051" not in directives, "nginx.conf changed shape: update this test's substitutions"
        assert "/etc/nginx" not in directives, "nginx.conf changed shape: update this test's substitutions"
        (workdir / "nginx.conf").write_text(conf)
        (workdir / "logs").mkdir()
        globals_ = f"daemon off; pid {workdir}/nginx.pid; error_log {workdir}/logs/error.log;"
        check = subprocess.run(
            [binary, "-t", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", globals_], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", globals_], stderr=subprocess.DEVNULL
        )
        self.workdir = workdir
        wait_for(self._up, 15, "nginx to listen")

    @property
    def url(self) -> str:
        return f"{'https' if self.certs is not None else 'http'}://127.0.0.1:{self.http_port}"

    def _up(self) -> bool:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.certs / "ca.pem") if self.certs is not None else True
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, list[Replica]]]:
    binary = require_binary("nginx")
    replicas = [Replica().start() for _ in range(2)]
    nginx = Nginx(binary, tmp_path_factory.mktemp("nginx"), replicas)
    try:
        yield nginx, replicas
    finally:
        nginx.stop()
        for r in replicas:
            if r.running is not None:
                r.stop()


def _request() -> pb.EvaluateRequest:
    rng = np.random.default_rng(0)
    tensors = {"logits": rng.normal(size=(32, 4)).astype(np.float32), "labels": rng.integers(0, 4, 32)}
    return pb.EvaluateRequest(tensors={k: encode_tensor(v, k) for k, v in tensors.items()}, functions=[spec_to_proto("cross_entropy")])


def _evaluations(r: Replica) -> float:
    assert r.monitoring is not None
    assert r.monitoring.worker.flush_sync(10)  # the monitoring thread counts after the responses (as /metrics does, wait for it)
    return sum(s.value for f in r.monitoring.registry.collect() for s in f.samples if s.name == "lossd_evaluations_total")


def test_grpc_and_http_are_balanced_and_fail_over(stack: tuple[Nginx, list[Replica]]) -> None:
    nginx, replicas = stack
    request = _request()
    with grpc.insecure_channel(f"127.0.0.1:{nginx.grpc_port}") as channel:
        stub = pb_grpc.LossServiceStub(channel)
        values = {stub.Evaluate(request, timeout=30).results[0].values["value"] for _ in range(10)}
        assert len(values) == 1
        served = [_evaluations(r) for r in replicas]
        assert sum(served) == 10 and min(served) >= 3, served  # round robin over both

        with httpx.Client(base_url=f"http://127.0.0.1:{nginx.http_port}", timeout=30) as http:
            body = {
                "tensors": {
                    "x": {"dtype": "float32", "shape": [2], "data": [1, 2]},
                    "y": {"dtype": "float32", "shape": [2], "data": [1, 4]},
                },
                "functions": [{"name": "mse", "inputs": {"predictions": "x", "targets": "y"}}],
            }
            assert http.post("/v1/evaluate", json=body).json()["results"] == {"mse": 2.0}
            assert http.get("/dashboard").status_code == 200

            replicas[1].stop()  # one replica goes away: nginx retries on the other
            replicas[1].running = None
            for _ in range(6):
                assert stub.Evaluate(request, timeout=30).results[0].values["value"] in values
                assert http.post("/v1/evaluate", json=body).status_code == 200


def _in_flight_evaluates(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lossd_grpc_in_flight_requests{") and 'grpc_method="Evaluate"' in line
    )


def _evaluations_of(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("lossd_evaluations_total{"))


def test_a_request_that_killed_its_replica_is_not_replayed_onto_the_next(tmp_path: Path) -> None:
    """kill -9 of the replica computing a request: INTERNAL (never retried), and the other replica never sees it."""
    import signal

    from integration.lossd_process import LossdProcess

    binary = require_binary("nginx")
    rng = np.random.default_rng(0)
    heavy = pb.EvaluateRequest(  # exact AUROC over 400,000 × 20 scores: seconds of compute
        tensors={
            "logits": encode_tensor(rng.standard_normal((400_000, 20)).astype(np.float32)),
            "labels": encode_tensor(rng.integers(0, 20, 400_000)),
        },
        functions=[spec_to_proto("auroc")],
    )
    with LossdProcess() as first, LossdProcess() as second:
        replicas = [first, second]

        class Address:  # what the Nginx helper reads of a replica
            def __init__(self, p: LossdProcess) -> None:
                self.grpc_address, self.url = p.grpc_address, p.url

        nginx = Nginx(binary, tmp_path, [Address(p) for p in replicas])  # type: ignore[list-item]
        try:
            with grpc.insecure_channel(f"127.0.0.1:{nginx.grpc_port}") as channel:
                stub = pb_grpc.LossServiceStub(channel)
                call = stub.Evaluate.future(heavy, timeout=120)
                deadline = time.monotonic() + 60
                busy: list[LossdProcess] = []
                while not busy:
                    assert time.monotonic() < deadline, "the heavy request never started"
                    busy = [p for p in replicas if _in_flight_evaluates(p.url) >= 1]
                    time.sleep(0.05)
                (victim,) = busy
                (survivor,) = [p for p in replicas if p is not victim]
                before = _evaluations_of(survivor.url)
                os.kill(victim.pid, signal.SIGKILL)
                with pytest.raises(grpc.RpcError) as info:
                    call.result(60)
                assert info.value.code() == grpc.StatusCode.INTERNAL, info.value.details()
                time.sleep(1.0)
                assert _in_flight_evaluates(survivor.url) == 0 and _evaluations_of(survivor.url) == before  # never replayed
                # A new call reaches the survivor (the dead replica cannot be connected to: that is passed on).
                for _ in range(4):
                    assert stub.Evaluate(_request(), timeout=30).results[0].values["value"] > 0
        finally:
            nginx.stop()


def test_tls_through_nginx_to_tls_replicas_with_tokens_matches_a_direct_call(tmp_path: Path) -> None:
    """nginx.conf as written: TLS to nginx, TLS from nginx to replicas that require tokens; the caller's token passes through."""
    from integration.lossd_process import LossdProcess

    binary = require_binary("nginx")
    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_certs.py"), "--out", str(certs), "--days", "1"], check=True, capture_output=True
    )
    token = (certs / "tokens").read_text().split("local:")[1].split()[0]
    tls = {"tls_cert_file": certs / "server.pem", "tls_key_file": certs / "server-key.pem", "auth_tokens_file": certs / "tokens"}
    roots = (certs / "ca.pem").read_bytes()
    with_token = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(roots), grpc.access_token_call_credentials(token))
    body = {
        "tensors": {"x": {"dtype": "float32", "shape": [3], "data": [1, 2, 3]}, "y": {"dtype": "float32", "shape": [3], "data": [1, 4, 0]}},
        "functions": [{"name": "mse", "inputs": {"predictions": "x", "targets": "y"}}],
    }
    https = ssl.create_default_context(cafile=certs / "ca.pem")
    bearer = {"authorization": f"Bearer {token}"}
    request = _request()
    with LossdProcess(**tls) as first, LossdProcess(**tls) as second:
        assert first.url.startswith("https://")
        with grpc.secure_channel(first.grpc_address, with_token) as channel:
            direct = pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30).results[0].values["value"]
        direct_http = httpx.post(f"{first.url}/v1/evaluate", json=body, headers=bearer, verify=https, timeout=30).json()["results"]
        assert direct_http == {"mse": pytest.approx((0 + 4 + 9) / 3)}  # (1-1)², (2-4)², (3-0)²

        (tmp_path / "nginx").mkdir()
        nginx = Nginx(binary, tmp_path / "nginx", [first, second], certs=certs)  # type: ignore[list-item]
        try:
            with grpc.secure_channel(f"127.0.0.1:{nginx.grpc_port}", with_token) as channel:
                stub = pb_grpc.LossServiceStub(channel)
                for _ in range(4):  # round robin: both replicas answer the same
                    assert stub.Evaluate(request, timeout=30).results[0].values["value"] == direct
            with grpc.secure_channel(f"127.0.0.1:{nginx.grpc_port}", grpc.ssl_channel_credentials(roots)) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
            with httpx.Client(base_url=nginx.url, verify=https, timeout=30) as http:
                for _ in range(4):
                    assert http.post("/v1/evaluate", json=body, headers=bearer).json()["results"] == direct_http
                assert http.post("/v1/evaluate", json=body).status_code == 401
                assert http.get("/dashboard", headers=bearer).status_code == 200
            with pytest.raises(httpx.HTTPError):  # nginx speaks only TLS
                httpx.get(f"http://127.0.0.1:{nginx.http_port}/healthz", timeout=5).raise_for_status()
        finally:
            nginx.stop()
