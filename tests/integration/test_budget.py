"""Memory bombs against a real ``lossd serve``: each refused in under a second, before allocating, RSS unchanged.

The requests are built with lossd.v1 directly (no client-side checks), as the
attack that found them sent them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.lossd_process import LossdProcess

from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

RNG = np.random.default_rng(0)


def classes(n: int, k: int) -> dict[str, pb.Tensor]:
    return {
        "logits": encode_tensor(RNG.standard_normal((n, k)).astype(np.float32)),
        "labels": encode_tensor(RNG.integers(0, k, n)),
    }


def bomb(tensors: dict[str, pb.Tensor], *specs: dict) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(tensors=tensors, functions=[spec_to_proto(s) for s in specs])


BOMBS = {
    "auroc bins=10^6, K=64": bomb(classes(8, 64), {"name": "auroc", "params": {"bins": 1_000_000}}),
    "auroc bins=10^6, K=128": bomb(classes(8, 128), {"name": "auroc", "params": {"bins": 1_000_000}}),
    "ece classwise 1000 bins, K=100000": bomb(classes(1, 100_000), {"name": "ece", "params": {"scope": "classwise", "n_bins": 1000}}),
    "moe_load_balancing top_k=E=8000": bomb(
        {"router_logits": encode_tensor(RNG.standard_normal((1, 8000)).astype(np.float32))},
        {"name": "moe_load_balancing", "params": {"top_k": 8000}},
    ),
    "32 confusion_matrix on [1, 4096]": bomb(classes(1, 4096), *({"name": "confusion_matrix", "alias": f"cm{i}"} for i in range(32))),
    "8 confusion_matrix on [1, 4096] (1 GiB response)": bomb(
        classes(1, 4096), *({"name": "confusion_matrix", "alias": f"cm{i}"} for i in range(8))
    ),
    "sphereface margin 100000": bomb(
        {
            "embeddings": encode_tensor(RNG.standard_normal((4, 8)).astype(np.float32)),
            "class_weights": encode_tensor(RNG.standard_normal((8, 3)).astype(np.float32)),
            "labels": encode_tensor(np.arange(4) % 3),
        },
        {"name": "sphereface", "params": {"margin": 100_000}},
    ),
}


@pytest.fixture(scope="module")
def served() -> Iterator[LossdProcess]:
    with LossdProcess(max_request_memory_bytes=1 << 30) as process:  # 1 GiB: every bomb is far over it
        yield process


@pytest.fixture(scope="module")
def stub(served: LossdProcess) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(served.grpc_address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.mark.parametrize("name", list(BOMBS))
def test_each_memory_bomb_is_refused_in_under_a_second_with_rss_unchanged(
    name: str, served: LossdProcess, stub: pb_grpc.LossServiceStub
) -> None:
    stub.Evaluate(bomb(classes(64, 8), {"name": "cross_entropy"}), timeout=30)  # warm: imports and first-call allocations
    before = served.rss_bytes()
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(BOMBS[name], timeout=30)
    elapsed = time.perf_counter() - t0
    after = served.rss_bytes()
    code = info.value.code()
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), (code, info.value.details())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "max_request_memory_bytes" in info.value.details() or "max_message_bytes" in info.value.details()
    assert elapsed < 1.0, f"{name}: answered in {elapsed:.2f}s"
    assert abs(after - before) <= 0.1 * before, f"{name}: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    print(f"{name}: {code.name} in {elapsed * 1000:.0f} ms, RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")


def test_a_bomb_never_affects_a_concurrent_legitimate_request(stub: pb_grpc.LossServiceStub) -> None:
    logits = RNG.standard_normal((256, 10)).astype(np.float32)
    labels = RNG.integers(0, 10, 256)
    expected = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    legit = pb.EvaluateRequest(
        tensors={"logits": encode_tensor(logits), "labels": encode_tensor(labels)}, functions=[spec_to_proto("cross_entropy")]
    )
    stop = threading.Event()
    refused: list[grpc.StatusCode] = []

    def attack() -> None:
        bombs = list(BOMBS.values())
        i = 0
        while not stop.is_set():
            try:
                stub.Evaluate(bombs[i % len(bombs)], timeout=30)
            except grpc.RpcError as exc:
                refused.append(exc.code())
            i += 1

    attackers = [threading.Thread(target=attack) for _ in range(2)]
    for t in attackers:
        t.start()
    try:
        latencies = []
        for _ in range(30):
            t0 = time.perf_counter()
            response = stub.Evaluate(legit, timeout=30)
            latencies.append(time.perf_counter() - t0)
            assert response.results[0].values["value"] == pytest.approx(expected, rel=1e-6)
    finally:
        stop.set()
        for t in attackers:
            t.join(60)
    assert refused and set(refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    assert max(latencies) < 1.0, f"legitimate requests took up to {max(latencies):.2f}s beside the bombs"
