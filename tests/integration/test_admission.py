"""Admission control over real gRPC: RESOURCE_EXHAUSTED with RetryInfo past the bounds, honoured by the client's retries.

A stream holds one of ``max_concurrent_requests`` for its whole life, which
makes the bound easy to reach deterministically: one open stream, a
server that admits one request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from integration.conftest import ServerThread, serving_with, start_server

from lossd.client import Client
from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc


def request(n: int = 8, k: int = 4, seed: int = 0) -> tuple[pb.EvaluateRequest, float]:
    """A cross_entropy request and its value by torch."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k)).astype(np.float32)
    labels = rng.integers(0, k, n)
    expected = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    message = pb.EvaluateRequest(
        tensors={"logits": encode_tensor(logits), "labels": encode_tensor(labels)}, functions=[spec_to_proto("cross_entropy")]
    )
    return message, expected


class MethodCounter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the Evaluate calls the server receives (retries included)."""

    def __init__(self) -> None:
        self.evaluates = 0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.endswith("/Evaluate"):
            self.evaluates += 1
        return await continuation(details)


@pytest.fixture()
def one_slot() -> Iterator[tuple[ServerThread, MethodCounter]]:
    yield from serving_with(MethodCounter(), max_concurrent_requests=1, retry_after_seconds=0.2)


class HeldStream:
    """An EvaluateStream kept open (holding its admission slot) until ``close``."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.messages: queue.Queue[pb.EvaluateRequest | None] = queue.Queue()
        first, self.expected = request()
        self.messages.put(first)
        self.future = pb_grpc.LossServiceStub(self.channel).EvaluateStream.future(iter(self.messages.get, None), timeout=30)
        time.sleep(0.3)  # the server has admitted it

    def close(self) -> pb.EvaluateResponse:
        self.messages.put(None)
        response: pb.EvaluateResponse = self.future.result(30)
        self.channel.close()
        return response


def details_of(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.RetryInfo | None]:
    status = rpc_status.from_call(error)
    assert status is not None
    info, retry = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return info, retry


def test_past_max_concurrent_requests_the_answer_is_resource_exhausted_with_retry_info(
    one_slot: tuple[ServerThread, MethodCounter],
) -> None:
    server, _ = one_slot
    held = HeldStream(server.address)
    message, expected = request(seed=1)
    with grpc.insecure_channel(server.address) as channel:  # no retry policy: the first answer is seen
        stub = pb_grpc.LossServiceStub(channel)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(message, timeout=10)
        elapsed = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_requests" in info.value.details()
        error_info, retry = details_of(info.value)
        assert error_info is not None and error_info.reason == "OVERLOADED"
        assert error_info.metadata["setting"] == "max_concurrent_requests"
        assert retry is not None and 0.1 <= retry.retry_delay.ToTimedelta().total_seconds() <= 0.3  # 0.2 s ± 50%
        assert elapsed < 1.0  # refused at once, not queued
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # saturation never flips health
        response = held.close()
        assert response.results[0].values["value"] == pytest.approx(held.expected, rel=1e-6)
        # The slot is free again.
        assert stub.Evaluate(message, timeout=10).results[0].values["value"] == pytest.approx(expected, rel=1e-6)


def test_the_client_retries_an_overloaded_answer_after_the_hint(one_slot: tuple[ServerThread, MethodCounter]) -> None:
    server, counter = one_slot
    held = HeldStream(server.address)
    releaser = threading.Timer(0.5, held.close)
    releaser.start()
    message, expected = request(seed=2)
    counter.evaluates = 0
    try:
        with Client(server.address, timeout=20) as client:
            result = client.evaluate_request(message)
    finally:
        releaser.join()
    assert result["cross_entropy"].value == pytest.approx(expected, rel=1e-6)
    assert counter.evaluates >= 2  # refused at least once, then retried after the pushback


def test_a_request_over_a_budget_is_never_retried() -> None:
    counter = MethodCounter()
    server = start_server(interceptors=[counter], max_request_memory_bytes=1 << 20)
    try:
        # An AUROC histogram of bins x classes float64 sums: 100,000 x 64 x 8 x 2 bytes, far over 1 MiB.
        rng = np.random.default_rng(0)
        scores = rng.standard_normal((8, 64)).astype(np.float32)
        labels = rng.integers(0, 64, 8)
        with Client(server.address, timeout=20) as client:
            message = pb.EvaluateRequest(
                tensors={"logits": encode_tensor(scores), "labels": encode_tensor(labels)},
                functions=[spec_to_proto({"name": "auroc", "params": {"bins": 100_000}})],
            )
            t0 = time.perf_counter()
            with pytest.raises(Exception) as info:
                client.evaluate_request(message)
            elapsed = time.perf_counter() - t0
        assert "max_request_memory_bytes" in str(info.value)
        assert counter.evaluates == 1 and elapsed < 1.0
    finally:
        server.stop()
