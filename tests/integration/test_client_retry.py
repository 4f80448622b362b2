"""Which RESOURCE_EXHAUSTED answers the client retries, counted by a real server: only those marked retryable.

An overloaded replica marks its refusal retryable (google.rpc.RetryInfo and
gRPC's retry pushback): the client tries again after the hint, with jitter.
A request over a budget (message size, memory, response size, exact-state
limit) would fail identically on every attempt: it is sent once, and the
error names the setting that bounds it. Each case is checked for the
blocking client, the asyncio one, and runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.conftest import ServerThread, serving_with, start_server
from integration.test_admission import HeldStream
from integration.wire_recording import MethodRecorder
from sklearn.metrics import roc_auc_score

from lossd.client import AsyncClient, Client, EvaluationResult, ResourceExhaustedError

MESSAGE_LIMIT = 64 * 1024


def classification(n: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((n, k)).astype(np.float32), "labels": rng.integers(0, k, n)}


def cross_entropy_of(batch: dict[str, np.ndarray]) -> float:
    return float(F.cross_entropy(torch.from_numpy(batch["logits"]).double(), torch.from_numpy(batch["labels"])))


OVERSIZED = classification(1024, 64)  # 256 KiB of logits: over the server's 64 KiB message limit
MEMORY_BOMB = (classification(8, 64), {"name": "auroc", "params": {"bins": 100_000}})  # 100,000 x 64 histograms, far over 1 MiB


@pytest.fixture(scope="module")
def bounded() -> Iterator[tuple[ServerThread, MethodRecorder]]:
    """A server with small budgets whose calls are recorded: every attempt that reaches it is counted."""
    recorder = MethodRecorder()
    server = start_server(
        interceptors=[recorder], max_message_bytes=MESSAGE_LIMIT, max_request_memory_bytes=1 << 20, exact_state_limit=1000
    )
    yield server, recorder
    server.stop()


def refused_once(recorder: MethodRecorder, method: str, call: Callable[[], object]) -> ResourceExhaustedError:
    """Run ``call``, which must fail with RESOURCE_EXHAUSTED after exactly one ``method`` attempt."""
    recorder.methods.clear()
    with pytest.raises(ResourceExhaustedError) as info:
        call()
    assert recorder.methods == [method], f"expected one {method} attempt, the server saw {recorder.methods}"
    return info.value


def assert_names_message_limit(error: ResourceExhaustedError) -> None:
    assert error.setting == "max_message_bytes", error
    assert "LOSSD_MAX_MESSAGE_BYTES" in str(error) and str(MESSAGE_LIMIT) in str(error)


def test_a_message_over_the_servers_limit_is_sent_once(bounded: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = bounded
    with Client(server.address, timeout=30) as client:
        assert_names_message_limit(refused_once(recorder, "Evaluate", lambda: client.evaluate(OVERSIZED, "cross_entropy")))
        streamed = refused_once(recorder, "EvaluateStream", lambda: client.evaluate_stream([OVERSIZED], "cross_entropy"))
        assert_names_message_limit(streamed)
        run = client.run("cross_entropy")
        assert_names_message_limit(refused_once(recorder, "Evaluate", lambda: run.update(OVERSIZED)))
        small = classification(8, 64, seed=1)
        assert run.update(small)["cross_entropy"].value == pytest.approx(cross_entropy_of(small), rel=1e-6)  # the run is intact


def test_an_asyncio_message_over_the_servers_limit_is_sent_once(bounded: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = bounded

    async def main() -> list[ResourceExhaustedError]:
        errors = []
        async with AsyncClient(server.address, timeout=30) as client:
            calls: list[tuple[str, Callable[[], Awaitable[EvaluationResult]]]] = [
                ("Evaluate", lambda: client.evaluate(OVERSIZED, "cross_entropy")),
                ("EvaluateStream", lambda: client.evaluate_stream([OVERSIZED], "cross_entropy")),
                ("Evaluate", lambda: client.run("cross_entropy").update(OVERSIZED)),
            ]
            for method, call in calls:
                recorder.methods.clear()
                with pytest.raises(ResourceExhaustedError) as info:
                    await call()
                assert recorder.methods == [method], f"expected one {method} attempt, the server saw {recorder.methods}"
                errors.append(info.value)
        return errors

    for error in asyncio.run(main()):
        assert_names_message_limit(error)


def test_a_request_over_the_memory_budget_is_sent_once(bounded: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = bounded
    batch, spec = MEMORY_BOMB
    with Client(server.address, timeout=30) as client:
        error = refused_once(recorder, "Evaluate", lambda: client.evaluate(batch, spec))
        assert error.setting == "max_request_memory_bytes" and "LOSSD_MAX_REQUEST_MEMORY_BYTES" in str(error)
        error = refused_once(recorder, "Evaluate", lambda: client.run(spec).update(batch))
        assert error.setting == "max_request_memory_bytes"

    async def main() -> ResourceExhaustedError:
        async with AsyncClient(server.address, timeout=30) as client:
            recorder.methods.clear()
            with pytest.raises(ResourceExhaustedError) as info:
                await client.evaluate(batch, spec)
            assert recorder.methods == ["Evaluate"]
            return info.value

    assert asyncio.run(main()).setting == "max_request_memory_bytes"


def test_a_run_over_the_exact_state_limit_merges_once(bounded: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = bounded
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(3):  # 3 x 400 scores: each batch fits the limit of 1000, their merge does not
        targets = (rng.random(400) < 0.5).astype(np.float64)
        batches.append({"logits": rng.standard_normal(400) + targets, "targets": targets})
    with Client(server.address, timeout=30) as client:
        run = client.run("auroc")
        for batch in batches[:2]:
            run.update(batch)
        two = run.result()["auroc"].value  # 800 scores: under the limit
        both = np.concatenate([b["targets"] for b in batches[:2]]), np.concatenate([b["logits"] for b in batches[:2]])
        assert two == pytest.approx(roc_auc_score(*both), abs=1e-12)
        run.update(batches[2])
        error = refused_once(recorder, "Finalize", run.result)
        assert error.setting == "exact_state_limit" and "LOSSD_EXACT_STATE_LIMIT" in str(error)


def test_a_response_over_this_clients_receive_limit_is_received_once(bounded: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = bounded
    with Client(server.address, timeout=30, options=[("grpc.max_receive_message_length", 200)]) as client:
        batch = classification(8, 10, seed=2)
        error = refused_once(recorder, "Evaluate", lambda: client.evaluate(batch, ["cross_entropy", "confusion_matrix"]))
    assert error.setting == "grpc.max_receive_message_length" and "client" in str(error)


# -- overloaded answers: retried after the hint ------------------------------------------------------


@pytest.fixture()
def one_slot() -> Iterator[tuple[ServerThread, MethodRecorder]]:
    """A server that admits one request at a time and asks refused ones to retry after 0.2 s (± 50%)."""
    yield from serving_with(MethodRecorder(), max_concurrent_requests=1, retry_after_seconds=0.2)


def held_for(server: ServerThread, seconds: float) -> threading.Timer:
    """Occupy the server's one slot for ``seconds`` with an open stream."""
    held = HeldStream(server.address)
    release = threading.Timer(seconds, held.close)
    release.start()
    return release


def test_an_overloaded_answer_is_retried_after_the_hint_by_every_kind_of_call(one_slot: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = one_slot
    batch = classification(8, 4, seed=4)
    expected = cross_entropy_of(batch)
    with Client(server.address, timeout=30) as client:
        calls: list[tuple[str, Callable[[], EvaluationResult]]] = [
            ("Evaluate", lambda: client.evaluate(batch, "cross_entropy")),
            ("Evaluate", lambda: client.run("cross_entropy").update(batch)),
            ("EvaluateStream", lambda: client.evaluate_stream([batch, batch], "cross_entropy")),
        ]
        for method, call in calls:
            release = held_for(server, 0.5)
            recorder.methods.clear()
            t0 = time.perf_counter()
            try:
                result = call()
            finally:
                release.join()
            assert result["cross_entropy"].value == pytest.approx(expected, rel=1e-6)
            attempts = [m for m in recorder.methods if m == method]
            assert len(attempts) >= 2, recorder.methods  # refused, then retried
            assert time.perf_counter() - t0 >= 0.1  # never before the smallest hint


def test_an_asyncio_overloaded_answer_is_retried(one_slot: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = one_slot
    batch = classification(8, 4, seed=5)

    async def main() -> float:
        async with AsyncClient(server.address, timeout=30) as client:
            result = await client.evaluate(batch, "cross_entropy")
            return float(result["cross_entropy"].value)

    release = held_for(server, 0.5)
    recorder.methods.clear()
    try:
        value = asyncio.run(main())
    finally:
        release.join()
    assert value == pytest.approx(cross_entropy_of(batch), rel=1e-6)
    assert recorder.methods.count("Evaluate") >= 2, recorder.methods


def test_an_overloaded_stream_of_a_generator_is_replayed_reading_each_batch_once(one_slot: tuple[ServerThread, MethodRecorder]) -> None:
    server, recorder = one_slot
    batches = [classification(8, 4, seed=6), classification(8, 4, seed=7)]
    read: list[int] = []

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for index, batch in enumerate(batches):
            read.append(index)
            yield batch

    release = held_for(server, 0.5)
    recorder.methods.clear()
    try:
        with Client(server.address, timeout=30) as client:
            result = client.evaluate_stream(generate(), "cross_entropy")
    finally:
        release.join()
    both = {"logits": np.concatenate([b["logits"] for b in batches]), "labels": np.concatenate([b["labels"] for b in batches])}
    assert result["cross_entropy"].value == pytest.approx(cross_entropy_of(both), rel=1e-6)
    assert result.response.batches == 2  # replayed whole, counted once
    assert recorder.methods.count("EvaluateStream") >= 2, recorder.methods
    assert read == [0, 1]  # the messages sent were kept and replayed: the generator is read once
