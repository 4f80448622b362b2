"""deploy/nginx/nginx.conf with a real nginx: gRPC and HTTP balanced over two replicas, failover included."""

from __future__ import annotations

import os
import subprocess
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
    """The repo's nginx.conf with the compose hostnames and ports replaced by loopback ones."""

    def __init__(self, binary: str, workdir: Path, replicas: list[Replica]) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
        for i, r in enumerate(replicas, start=1):
            conf = conf.replace(f"lossd-{i}:50051", r.grpc_address).replace(f"lossd-{i}:8000", r.url.removeprefix("http://"))
        conf = conf.replace("listen 50051 http2;", f"listen 127.0.0.1:{self.grpc_port} http2;").replace(
            "listen 8080;", f"listen 127.0.0.1:{self.http_port};"
        )
        directives = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
        assert "lossd-" not in directives and "50051" not in directives, "nginx.conf changed shape: update this test's substitutions"
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

    def _up(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).status_code == 200
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
