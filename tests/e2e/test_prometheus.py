"""Prometheus' recording rules over two replicas equal lossd's own answer for the whole data set.

Two lossd replicas each get half of a data set (in several batches, through
the HTTP gateway); a real Prometheus scrapes both and evaluates the repo's
recording rules. The pooled ECE, mean loss and reliability bins read back
through Prometheus' HTTP API must equal what one lossd request over the whole
data set returns.
"""

from __future__ import annotations

import base64
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import Prometheus, wait_for
from replica import Replica

from lossd.client.codec import encode_tensor
from lossd.client.results import response_to_json
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

N, K, BINS = 3000, 10, 15
TAGS = {"model": "e2e-model", "dataset": "e2e-data", "split": "test"}
SELECTOR = '{model="e2e-model", dataset="e2e-data", split="test"}'


def _dataset() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, K, N)
    logits = rng.normal(size=(N, K)) * 1.5
    hit = rng.random(N) < 0.7
    logits[np.arange(N), np.where(hit, labels, (labels + 3) % K)] += 2.0
    return {"logits": logits.astype(np.float32), "labels": labels.astype(np.int64)}


def _b64(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _whole(address: str, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Lossd's answer for the whole data set in one request (no tags: its counters stay apart)."""
    functions = ["cross_entropy", f"ece:n_bins={BINS}", f"reliability_diagram:n_bins={BINS}"]
    with grpc.insecure_channel(address) as channel:
        request = pb.EvaluateRequest(
            tensors={k: encode_tensor(v, k) for k, v in data.items()}, functions=[spec_to_proto(f) for f in functions]
        )
        return response_to_json(pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=60))["results"]


def _value(prometheus: Prometheus, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_recording_rules_pool_replicas_exactly(replicas: list[Replica], prometheus: Prometheus) -> None:
    data = _dataset()
    halves = [slice(0, N // 2), slice(N // 2, N)]
    for replica, half in zip(replicas, halves, strict=True):
        with httpx.Client(base_url=replica.url, timeout=60) as client:
            rows = np.arange(N)[half]
            for batch in np.array_split(rows, 3):  # several batches per replica, of unequal ECE
                body = {
                    "tensors": {k: _b64(v[batch]) for k, v in data.items()},
                    "functions": ["cross_entropy", f"ece:n_bins={BINS}"],
                    "tags": TAGS,
                }
                response = client.post("/v1/evaluate", json=body)
                assert response.status_code == 200, response.text
    expected = _whole(replicas[0].grpc_address, data)

    # Once the last scrape and rule evaluation saw every row, the windows hold the whole data set.
    wait_for(
        lambda: _value(prometheus, f"model_dataset_split:lossd_calibration_predictions:increase5m{SELECTOR}") == N,
        30,
        "the ECE rule to see every row",
    )
    wait_for(
        lambda: (
            _value(prometheus, f'model_dataset_split_function:lossd_loss_denominator:increase5m{SELECTOR[:-1]}, function="cross_entropy"}}')
            == N
        ),
        30,
        "the loss rule to see every row",
    )

    ece = _value(prometheus, f"model_dataset_split:lossd_ece:ratio5m{SELECTOR}")
    loss = _value(prometheus, f'model_dataset_split_function:lossd_loss:mean5m{SELECTOR[:-1]}, function="cross_entropy"}}')
    assert ece is not None and loss is not None
    print(f"\nECE   prometheus {ece!r}  lossd {expected['ece']!r}  |diff| {abs(ece - expected['ece']):.3g}")
    print(f"loss  prometheus {loss!r}  lossd {expected['cross_entropy']!r}  |diff| {abs(loss - expected['cross_entropy']):.3g}")
    assert abs(ece - expected["ece"]) <= 1e-6
    assert abs(loss - expected["cross_entropy"]) <= 1e-6

    # The pooled reliability diagram, bin by bin.
    accuracy = {
        round(float(s["metric"]["bin_upper"]) * BINS) - 1: float(s["value"][1])
        for s in prometheus.query(f"model_dataset_split_bin_upper:lossd_calibration_accuracy:ratio5m{SELECTOR}")
    }
    diagram = expected["reliability_diagram"]
    for b, count in enumerate(diagram["count"]):
        if count > 0:
            assert abs(accuracy[b] - diagram["accuracy"][b]) <= 1e-6, f"bin {b}"
        else:
            assert b not in accuracy

    # Each replica alone is not the answer: the test would notice a rule that pooled wrongly.
    per_replica = [float(s["value"][1]) for s in prometheus.query(f"sum by (instance) (lossd_calibration_predictions_total{SELECTOR})")]
    assert sorted(per_replica) == [N / 2, N / 2]
