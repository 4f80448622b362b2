"""The estimated memory of the work running at once is bounded (max_concurrent_memory_bytes), not only each request's own.

An audit ran four concurrent 88-byte requests for classwise ECE over 15,000
classes × 1,000 bins: each within its budget, together 3.2 GB of resident
memory, and at 110,000 classes four would need 23 GB of a 24 GB host."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from lossd.kernels import evaluate
from lossd.kernels.budget import Budget
from lossd.server.admission import Admission, AdmissionLimits, Overloaded

MiB = 1 << 20
# classwise ECE over K classes × 1000 bins: a state of K × 1000 × 3 float64 cells, a few times over
CLASSWISE = [{"name": "ece", "params": {"scope": "classwise", "n_bins": 1000}}]


def _empty_batch(k: int) -> dict[str, np.ndarray]:
    return {"logits": np.zeros((0, k), np.float32), "labels": np.zeros(0, np.int64)}


def _admission(max_bytes: int) -> tuple[Admission, Budget]:
    admission = Admission(AdmissionLimits(compute_threads=2, max_concurrent_memory_bytes=max_bytes))
    return admission, Budget(1 << 40, None, admission.memory.reserve)


def test_work_over_the_sum_is_refused_while_other_work_runs_and_passes_after() -> None:
    admission, budget = _admission(400 * MiB)
    started, finish = threading.Event(), threading.Event()

    def held() -> str:
        evaluate(_empty_batch(4000), CLASSWISE, budget=budget)  # reserves its estimate, then holds it
        started.set()
        assert finish.wait(10)
        return "first"

    def second() -> str:
        evaluate(_empty_batch(4000), CLASSWISE, budget=budget)
        return "second"

    async def main() -> None:
        first = asyncio.ensure_future(admission.run(held, nbytes=100))
        assert await asyncio.to_thread(started.wait, 10)
        reserved = admission.memory.reserved
        assert 200 * MiB < reserved <= 400 * MiB  # one classwise state of 4000 classes: 244 MiB
        with pytest.raises(Overloaded) as refused:
            await admission.run(second, nbytes=100)
        assert refused.value.setting == "max_concurrent_memory_bytes"
        assert "LOSSD_MAX_CONCURRENT_MEMORY_BYTES" in str(refused.value) and "retry after" in str(refused.value)
        assert admission.memory.reserved == reserved  # the refused work reserved nothing
        finish.set()
        assert await first == "first"
        assert admission.memory.reserved == 0
        assert await admission.run(second, nbytes=100) == "second"  # alone now: it passes
        assert admission.memory.reserved == 0

    try:
        asyncio.run(main())
    finally:
        finish.set()
        admission.close()


def test_one_request_alone_is_bounded_by_its_own_budget_only() -> None:
    admission, budget = _admission(1 * MiB)
    try:
        out = asyncio.run(admission.run(lambda: evaluate(_empty_batch(4000), CLASSWISE, budget=budget), nbytes=100))
        assert "ece" in out.results
        assert admission.memory.reserved == 0
    finally:
        admission.close()


@pytest.mark.parametrize("inline", [False, True])
def test_what_failed_work_reserved_is_freed(inline: bool) -> None:
    admission, budget = _admission(1 << 40)

    def fails() -> None:
        budget.reserve(10 * MiB) if budget.reserve else None
        raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError):
            asyncio.run(admission.run(fails, nbytes=10, inline=inline))
        assert admission.memory.reserved == 0
    finally:
        admission.close()
