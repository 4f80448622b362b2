"""compute="local" runs under the default SEND_INTERVAL: one Finalize covers the batches merged since the last, totals exact."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from unit.client.test_local_sends import FUNCTIONS, LOST, Server, batch, kernel_values, local_run, values

from lossd.client import local_sends
from lossd.client.errors import UnavailableError
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import function_specs
from lossd.client.run import AsyncRun


@pytest.fixture(autouse=True)
def long_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_sends, "SEND_INTERVAL", 30.0)  # every update after the first is held back


def ce_batches(server: Server, call: int) -> int:
    """The batches the server's merge of call ``call`` covers (its cross_entropy states' batches, added)."""
    return sum(s.batches for alias, s in server.calls[call][0] if alias == "cross_entropy")


def test_held_batches_go_with_the_next_send_and_totals_are_exact() -> None:
    server = Server()
    run = local_run(server)
    batches = [batch(seed) for seed in range(5)]
    for i, b in enumerate(batches):
        assert values(run.update(b)) == kernel_values(batches[: i + 1])
    assert len(server.calls) == 1  # the first batch went at once; the others are held
    assert values(run.result()) == kernel_values(batches)
    assert len(server.calls) == 2 and ce_batches(server, 1) == 5  # one Finalize for batches 1-4, over all five


def test_a_held_send_that_fails_names_its_first_batch_and_the_run_goes_back_to_it() -> None:
    server = Server()
    server.failures[1] = UnavailableError(LOST)
    run = local_run(server)
    batches = [batch(seed) for seed in range(4)]
    for b in batches:
        run.update(b)
    with pytest.raises(UnavailableError, match=r"in batch 1 \(.*resend from batch 1$"):
        run.result()
    assert run.batches == 1  # batches 1-3 were in the failed send: not added
    for b in batches[1:]:
        run.update(b)
    assert values(run.result()) == kernel_values(batches)
    assert ce_batches(server, len(server.calls) - 1) == 4


def test_the_interval_sends_again_once_it_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_sends, "SEND_INTERVAL", 0.05)
    server = Server()
    run = local_run(server)
    run.update(batch(0))
    run.update(batch(1))  # held: under the interval
    time.sleep(0.1)
    run.update(batch(2))  # the interval has passed: this send carries batches 1 and 2
    run.result()  # waits for it; nothing is left to send
    assert len(server.calls) == 2 and ce_batches(server, 1) == 3


def test_an_async_run_holds_too_and_result_needs_merge_first() -> None:
    server = Server()

    class AsyncServer:
        async def finalize(self, states: Any, **options: Any) -> EvaluationResult:
            return await asyncio.to_thread(server.finalize, states, **options)

        async def evaluate_request(self, request: Any, *, timeout: float | None = None) -> EvaluationResult:
            raise AssertionError("a local run sends no tensors")

    async def main() -> dict[str, dict[str, float]]:
        run = AsyncRun(AsyncServer(), function_specs(FUNCTIONS), compute="local")
        for seed in range(3):
            await run.update(batch(seed))
        await asyncio.sleep(0.05)  # the first send is (most likely) answered; batches 1-2 are held either way
        with pytest.raises(local_sends.StillSending, match=r"await run\.merge\(\) before run\.result\(\)"):
            run.result()
        await run.merge()
        return values(run.result())

    assert asyncio.run(main()) == kernel_values([batch(seed) for seed in range(3)])
    assert len(server.calls) == 2 and ce_batches(server, 1) == 3


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "1e9"])
def test_a_bad_send_interval_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match="LOSSD_LOCAL_SEND_INTERVAL: expected seconds between 0 and 3600"):
        local_sends._send_interval(text)
