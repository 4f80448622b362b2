"""The fleet-wide dashboard: a gateway with prometheus_url answers /v1/history with every replica's traffic pooled."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from conftest import Prometheus, wait_for
from replica import Replica

from lossd.kernels import evaluate

pytestmark = pytest.mark.e2e


def _body(logits: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    tensors = {"logits": logits.astype(np.float32), "labels": labels.astype(np.int64)}
    return {
        "tensors": {
            k: {"dtype": str(v.dtype), "shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()} for k, v in tensors.items()
        },
        "functions": ["cross_entropy", "accuracy"],
        "tags": {"model": "fleet-model", "dataset": "fleet-data", "split": "val", "step": 10},
    }


@pytest.fixture(scope="module")
def fleet_gateway(prometheus: Prometheus) -> Iterator[Replica]:
    gateway = Replica(backends=["127.0.0.1:1"], prometheus_url=prometheus.url).start()  # its own backend is never called here
    yield gateway
    gateway.stop()


def test_fleet_dashboard_returns_the_exact_loss_over_both_replicas(
    replicas: list[Replica], prometheus: Prometheus, fleet_gateway: Replica
) -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 7, 600)
    logits = rng.normal(size=(600, 7)) + 1.5 * np.eye(7)[labels]
    halves = [(logits[:350], labels[:350]), (logits[350:], labels[350:])]  # uneven halves: a mean of means would differ
    for replica, (lg, lb) in zip(replicas, halves, strict=True):
        assert httpx.post(f"{replica.url}/v1/evaluate", json=_body(lg, lb), timeout=60).status_code == 200
    whole = evaluate(
        {"logits": torch.from_numpy(logits.astype(np.float32)), "labels": torch.from_numpy(labels)}, ["cross_entropy", "accuracy", "ece"]
    )

    def pooled() -> dict[str, object] | None:
        data = httpx.get(f"{fleet_gateway.url}/v1/history", timeout=30).json()
        assert data["source"] == "prometheus"
        for s in data["series"]:
            if s["model"] == "fleet-model" and s["summary"]["count"] == 600:
                return s  # type: ignore[no-any-return]
        return None

    series = wait_for(pooled, 60, "the fleet dashboard to see both replicas' 600 rows")
    assert series["losses"] == ["cross_entropy"] and series["metrics"] == ["accuracy"]
    assert series["summary"]["loss"]["cross_entropy"] == pytest.approx(whole.results["cross_entropy"].value, abs=1e-6)
    assert series["summary"]["loss"]["accuracy"] == pytest.approx(whole.results["accuracy"].value, abs=1e-6)
    assert series["summary"]["ece"] == pytest.approx(whole.results["ece"].value, abs=1e-6)
    assert sum(series["reliability"]["count"]) == 600
    # Each replica alone has only its half: the local history of either is not the fleet's.
    local = httpx.get(f"{replicas[0].url}/v1/history", timeout=30).json()
    (mine,) = [s for s in local["series"] if s["model"] == "fleet-model"]
    assert mine["summary"]["count"] == 350 and mine["progress"]["axis"] == "step"


def test_free_form_tags_are_accepted_bounded_and_kept_out_of_prometheus(replicas: list[Replica]) -> None:
    import grpc

    from lossd.client.codec import encode_tensor
    from lossd.v1 import lossd_pb2 as pb
    from lossd.v1 import lossd_pb2_grpc as pb_grpc

    replica = replicas[1]
    body = _body(np.zeros((2, 3)), np.array([0, 1]))
    body["tags"] = {"model": "tagged", "epoch": 2, "checkpoint": "ckpt-7"}
    assert httpx.post(f"{replica.url}/v1/evaluate", json=body, timeout=30).status_code == 200
    body["tags"] = {"model": "tagged", "step": "-1"}
    refused = httpx.post(f"{replica.url}/v1/evaluate", json=body, timeout=30)
    assert refused.status_code == 400 and "tags.step: expected a non-negative integer step, got '-1'" in refused.text
    metrics = httpx.get(f"{replica.url}/metrics", timeout=30).text
    assert 'model="tagged"' in metrics and "ckpt-7" not in metrics and 'epoch="' not in metrics
    request = pb.EvaluateRequest(
        tensors={"logits": encode_tensor(np.zeros((2, 3), np.float32), "logits"), "labels": encode_tensor(np.array([0, 1]), "labels")},
        functions=[pb.FunctionSpec(name="cross_entropy")],
        tags=pb.Tags(model="tagged", extra={"step": "x"}),
    )
    with grpc.insecure_channel(replica.grpc_address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tags.extra.step: expected a non-negative integer step, got 'x'" in (caught.value.details() or "")
