"""compute="local" runs: values merged here, each update's Finalize sent in the background, failures raised by the next call."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from lossd.client import local_sends
from lossd.client.errors import CancelledError as LossdCancelledError
from lossd.client.errors import InvalidArgumentError, UnavailableError, invalid_argument
from lossd.client.evaluation import EvaluationResult
from lossd.client.local_sends import StillSending
from lossd.client.messages import function_specs
from lossd.client.run import AsyncRun, Run
from lossd.kernels import Accumulator
from lossd.v1 import lossd_pb2 as pb

FUNCTIONS = ["cross_entropy", "accuracy", "ece:n_bins=15", {"name": "auroc", "params": {"bins": 64}, "alias": "binned"}]
KERNEL_FUNCTIONS = [
    "cross_entropy",
    "accuracy",
    {"name": "ece", "params": {"n_bins": 15}},
    {"name": "auroc", "params": {"bins": 64}, "alias": "binned"},
]
LOST = "connection reset by the test"


@pytest.fixture(autouse=True)
def one_finalize_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests follow each batch's Finalize; coalesced sends (the default interval) are test_local_coalescing.py's."""
    monkeypatch.setattr(local_sends, "SEND_INTERVAL", 0.0)


def batch(seed: int, n: int = 64, k: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": (rng.standard_normal((n, k)) * 2).astype(np.float32), "labels": rng.integers(0, k, n)}


def values(result: EvaluationResult) -> dict[str, dict[str, float]]:
    return {alias: dict(r.values) for alias, r in result.items()}


def kernel_values(batches: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """In-process lossd.kernels over the batches: what the run's values must be, bit for bit."""
    acc = Accumulator(KERNEL_FUNCTIONS)
    for b in batches:
        acc.add(b)
    return {alias: r.values for alias, r in acc.result().results.items()}


class Server:
    """An Evaluator for Run: each Finalize is recorded, may be held at a gate, and fails when told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[str, pb.State]], dict[str, Any]]] = []
        self.failures: dict[int, BaseException] = {}  # call index -> what that call raises
        self.gate = threading.Event()
        self.gate.set()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def finalize(self, states: Any, **options: Any) -> EvaluationResult:
        with self._lock:
            index = len(self.calls)
            self.calls.append((list(states), options))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            assert self.gate.wait(30)
            time.sleep(0.005)
            if index in self.failures:
                raise self.failures[index]
            return EvaluationResult(pb.EvaluateResponse(request_id=options["request_id"]))
        finally:
            with self._lock:
                self.active -= 1

    def evaluate_request(self, request: Any, *, timeout: float | None = None) -> EvaluationResult:
        raise AssertionError("a local run sends no tensors")


def local_run(server: Server, **options: Any) -> Run:
    return Run(server, function_specs(FUNCTIONS), compute="local", **options)


def request_id(server: Server, call: int) -> str:
    return str(server.calls[call][1]["request_id"])


def test_update_returns_the_kernels_values_over_every_batch_so_far() -> None:
    server = Server()
    run = local_run(server)
    batches = [batch(seed) for seed in range(4)]
    outs = []
    for i, b in enumerate(batches):
        outs.append(run.update(b))
        assert values(outs[-1]) == kernel_values(batches[: i + 1]) and outs[-1].batches == i + 1
    assert values(run.result()) == kernel_values(batches)
    assert [out.request_id for out in outs] == [request_id(server, i) for i in range(4)]  # each update's Finalize
    # the server got every batch in order: the run's prior states, then the batch's
    prior_batches = [[s.batches for alias, s in states if alias == "cross_entropy"] for states, _ in server.calls]
    assert prior_batches == [[1], [1, 1], [2, 1], [3, 1]]


def test_update_does_not_wait_for_its_send_and_the_next_call_does() -> None:
    server = Server()
    run = local_run(server)
    server.gate.clear()
    run.update(batch(0))  # returns while its Finalize is held
    assert server.active == 1
    opened: list[float] = []

    def open_gate() -> None:
        time.sleep(0.2)
        opened.append(time.monotonic())
        server.gate.set()

    threading.Thread(target=open_gate).start()
    run.update(batch(1))
    assert opened and time.monotonic() >= opened[0]  # it waited for the first send before sending its own
    run.result()
    assert len(server.calls) == 2 and server.most_active == 1


@pytest.mark.parametrize("call", ["update", "merge", "result", "states", "named_states"])
def test_a_failed_send_is_raised_by_the_next_call_and_the_run_goes_back(call: str) -> None:
    server = Server()
    server.failures[2] = UnavailableError(LOST)
    run = local_run(server)
    batches = [batch(seed) for seed in range(5)]
    for b in batches[:3]:
        run.update(b)
    with pytest.raises(UnavailableError) as info:
        run.update(batches[3]) if call == "update" else getattr(run, call)()
    message = str(info.value)
    assert message.startswith(f"UNAVAILABLE: {LOST}")
    assert message.endswith(
        f"; in batch 2 (request id '{request_id(server, 2)}'), whose Finalize failed: batch 2 and later were not added; resend from batch 2"
    )
    assert info.value.code.name == "UNAVAILABLE" and isinstance(info.value.__cause__, UnavailableError)
    assert run.batches == 2
    assert values(run.result()) == kernel_values(batches[:2])  # the run is back to the acknowledged states
    for b in batches[2:]:
        run.update(b)
    assert values(run.result()) == kernel_values(batches)  # nothing lost, nothing counted twice
    assert server.calls[3][0] == server.calls[2][0]  # the resent batch's Finalize is the failed one's


def test_a_refused_send_names_the_batch_in_each_violation() -> None:
    server = Server()
    server.failures[1] = invalid_argument([("states[0].state.fields.total", "expected finite")])
    run = local_run(server)
    run.update(batch(0))
    run.update(batch(1))
    with pytest.raises(InvalidArgumentError) as info:
        run.merge()
    (violation,) = info.value.violations
    assert violation.description == (
        f"expected finite; in batch 1 (request id '{request_id(server, 1)}') (its Finalize was refused): "
        "batch 1 and later were not added; resend from batch 1"
    )
    assert run.batches == 1


def test_bad_input_is_raised_at_once_and_a_failed_send_by_the_call_after() -> None:
    server = Server()
    server.failures[1] = UnavailableError(LOST)
    run = local_run(server, nan_policy="raise")
    run.update(batch(0))
    run.update(batch(1))  # its send fails in the background
    bad = batch(2)
    bad["logits"][3, 1] = np.nan
    with pytest.raises(InvalidArgumentError, match=r"holds NaN .*; in batch 2$"):
        run.update(bad)  # computed here: refused before waiting for anything
    with pytest.raises(UnavailableError, match="resend from batch 1$"):
        run.update(batch(2))
    assert run.batches == 1
    run.update(batch(1))
    assert values(run.update(batch(2))) == kernel_values([batch(0), batch(1), batch(2)])


class AsyncServer:
    """An AsyncEvaluator twin of :class:`Server`."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[tuple[str, pb.State]], dict[str, Any]]] = []
        self.failures: dict[int, BaseException] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.finished = 0

    async def finalize(self, states: Any, **options: Any) -> EvaluationResult:
        index = len(self.calls)
        self.calls.append((list(states), options))
        await self.gate.wait()
        if index in self.failures:
            raise self.failures[index]
        self.finished += 1
        return EvaluationResult(pb.EvaluateResponse(request_id=options["request_id"]))

    async def evaluate_request(self, request: Any, *, timeout: float | None = None) -> EvaluationResult:
        raise AssertionError("a local run sends no tensors")


def test_an_async_run_sends_in_a_task_and_result_waits_for_merge() -> None:
    async def main() -> None:
        server = AsyncServer()
        run = AsyncRun(server, function_specs(FUNCTIONS), compute="local")
        batches = [batch(seed) for seed in range(3)]
        for i, b in enumerate(batches):
            assert values(await run.update(b)) == kernel_values(batches[: i + 1])
        with pytest.raises(StillSending, match=r"batch 2's Finalize is still being sent: await run.merge\(\) before run.result\(\)"):
            run.result()
        assert values(await run.merge()) == values(run.result()) == kernel_values(batches)
        assert len(server.calls) == server.finished == 3

    asyncio.run(main())


def test_an_async_failed_send_is_raised_by_the_next_update_and_the_run_goes_back() -> None:
    async def main() -> None:
        server = AsyncServer()
        server.failures[1] = UnavailableError(LOST)
        run = AsyncRun(server, function_specs(FUNCTIONS), compute="local")
        batches = [batch(seed) for seed in range(3)]
        await run.update(batches[0])
        await run.update(batches[1])
        with pytest.raises(
            UnavailableError, match=r"in batch 1 \(request id '[0-9a-f]{16}'\), whose Finalize failed: .* resend from batch 1$"
        ):
            await run.update(batches[2])
        assert run.batches == 1
        for b in batches[1:]:
            await run.update(b)
        assert values(await run.merge()) == kernel_values(batches)

    asyncio.run(main())


def test_an_async_update_cancelled_while_waiting_leaves_the_send_going() -> None:
    async def main() -> None:
        server = AsyncServer()
        run = AsyncRun(server, function_specs(FUNCTIONS), compute="local")
        server.gate.clear()
        await run.update(batch(0))
        waiting = asyncio.create_task(run.update(batch(1)))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert run.batches == 1 and len(server.calls) == 1
        server.gate.set()
        assert values(await run.update(batch(1))) == kernel_values([batch(0), batch(1)])
        await run.merge()
        assert server.finished == 2

    asyncio.run(main())


def test_an_async_send_cancelled_is_raised_as_lossds_cancelled_error_not_asyncios() -> None:
    async def main() -> None:
        server = AsyncServer()
        server.failures[0] = asyncio.CancelledError()  # the send's task ends cancelled
        run = AsyncRun(server, function_specs(FUNCTIONS), compute="local")
        await run.update(batch(0))
        with pytest.raises(LossdCancelledError, match=r"^CANCELLED: the Finalize was cancelled .*; in batch 0 .* resend from batch 0$"):
            await run.update(batch(1))
        assert run.batches == 0

    asyncio.run(main())
