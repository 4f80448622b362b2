"""Faults that must not spread: a large JSON body parsed while small calls and health checks go on."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from replica import Replica

from lossd.client import Client


@pytest.fixture(scope="module")
def replica() -> Iterator[Replica]:
    r = Replica().start()
    yield r
    r.stop()


def test_a_large_json_body_does_not_stall_health_or_small_calls(replica: Replica) -> None:
    rng = np.random.default_rng(0)
    predictions = rng.standard_normal((60_000, 32)).round(6)
    targets = rng.standard_normal((60_000, 32)).round(6)
    body = json.dumps(
        {
            "tensors": {
                "predictions": {"dtype": "float64", "shape": [60_000, 32], "data": predictions.tolist()},
                "targets": {"dtype": "float64", "shape": [60_000, 32], "data": targets.tolist()},
            },
            "functions": ["mse"],
        }
    ).encode()
    assert len(body) > 30 << 20
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(httpx.post(f"{replica.url}/v1/evaluate", content=body, headers={"content-type": "application/json"}, timeout=120))

    poster = threading.Thread(target=post)
    small = {"predictions": np.zeros(4), "targets": np.ones(4)}
    worst = 0.0
    with grpc.insecure_channel(replica.grpc_address) as channel, Client(replica.grpc_address, timeout=30) as client:
        health = health_pb2_grpc.HealthStub(channel)
        client.evaluate(small, "mse")  # warm
        poster.start()
        while poster.is_alive():
            t0 = time.perf_counter()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            assert client.evaluate(small, "mse")["mse"].value == 1.0
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.02)
    poster.join()
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"]["mse"] == pytest.approx(float(np.mean((predictions - targets) ** 2)), rel=1e-9)
    print(f"{len(body) / 2**20:.0f} MiB body; slowest health check + small call meanwhile {worst * 1000:.0f} ms")
    assert worst < 1.0, f"a health check and a small call took {worst:.2f}s while the large body was parsed"


def test_a_large_invalid_body_is_a_400_naming_the_field(replica: Replica) -> None:
    rows = [[0.5] * 32 for _ in range(20_000)]
    rows[7] = [0.5] * 31  # not rectangular
    body = json.dumps({"tensors": {"predictions": {"dtype": "float32", "shape": [20_000, 32], "data": rows}}, "functions": ["mse"]})
    assert len(body) > 1 << 20
    answer = httpx.post(f"{replica.url}/v1/evaluate", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert any("tensors.predictions" in e["field"] for e in answer.json()["errors"]), answer.text
    bad_json = b'{"tensors": ' + b"[" * 10 + b"1" * (2 << 20)
    answer = httpx.post(f"{replica.url}/v1/evaluate", content=bad_json, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 400 and answer.json()["errors"][0]["field"] == "body", answer.text
