"""Admission control on its own: bounds, the two lanes, cancellation of queued and running work."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lossd.kernels.cancellation import Cancelled, CancelToken, DeadlineExceeded, cancellable, check_cancelled
from lossd.server.admission import Admission, AdmissionLimits, Overloaded

LARGE = 1 << 20


def limits(**overrides: object) -> AdmissionLimits:
    base = {"max_concurrent_requests": 2, "max_queued_requests": 1, "max_queued_bytes": 10 * LARGE, "compute_threads": 1}
    return AdmissionLimits(**{**base, **overrides})  # type: ignore[arg-type]


def blocker() -> tuple[threading.Event, threading.Event, object]:
    """(started, release, fn): fn blocks its compute thread until release is set."""
    started, release = threading.Event(), threading.Event()

    def fn() -> str:
        started.set()
        release.wait(10)
        return "done"

    return started, release, fn


async def wait_started(event: threading.Event) -> None:
    deadline = time.monotonic() + 10
    while not event.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


def test_concurrent_requests_past_the_bound_are_refused_with_the_setting() -> None:
    async def main() -> None:
        admission = Admission(limits(max_concurrent_requests=1))
        async with admission.call():
            with pytest.raises(Overloaded) as info:
                async with admission.call():
                    pass
        assert info.value.setting == "max_concurrent_requests" and info.value.reason == "OVERLOADED"
        assert 0.5 <= info.value.retry_after <= 1.5  # the 1 s hint, jittered
        assert "max_concurrent_requests" in str(info.value) and "LOSSD_MAX_CONCURRENT_REQUESTS" in str(info.value)
        async with admission.call():  # the slot was given back
            pass
        admission.close()

    asyncio.run(main())


def test_queue_bound_and_small_requests_never_wait_behind_large_ones() -> None:
    async def main() -> None:
        admission = Admission(limits())
        started, release, fn = blocker()
        running = asyncio.ensure_future(admission.run(fn, nbytes=LARGE))  # type: ignore[arg-type]
        await wait_started(started)
        queued = asyncio.ensure_future(admission.run(lambda: "queued", nbytes=LARGE))
        await asyncio.sleep(0.05)
        assert admission.large.queued == 1
        with pytest.raises(Overloaded) as info:  # the large lane's queue (1) is full
            await admission.run(lambda: "refused", nbytes=LARGE)
        assert info.value.setting == "max_queued_requests"
        t0 = time.perf_counter()
        assert await admission.run(lambda: "small", nbytes=100) == "small"  # its own lane: no wait
        assert time.perf_counter() - t0 < 1.0
        release.set()
        assert await running == "done" and await queued == "queued"
        assert (admission.large.queued, admission.large.queued_bytes, admission.running()) == (0, 0, 0)
        admission.close()

    asyncio.run(main())


def test_queued_bytes_bound() -> None:
    async def main() -> None:
        admission = Admission(limits(max_queued_requests=5, max_queued_bytes=3 * LARGE))
        started, release, fn = blocker()
        running = asyncio.ensure_future(admission.run(fn, nbytes=LARGE))  # type: ignore[arg-type]
        await wait_started(started)
        queued = asyncio.ensure_future(admission.run(lambda: 1, nbytes=2 * LARGE))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as info:
            await admission.run(lambda: 2, nbytes=2 * LARGE)
        assert info.value.setting == "max_queued_bytes"
        release.set()
        await running
        assert await queued == 1
        admission.close()

    asyncio.run(main())


def test_cancelled_work_never_starts_when_queued_and_stops_at_its_next_check_when_running() -> None:
    async def main() -> None:
        admission = Admission(limits())
        checks = 0
        started = threading.Event()

        def long_loop() -> None:
            nonlocal checks
            started.set()
            while True:  # a chunk loop: the check is the only way out
                check_cancelled()
                checks += 1
                time.sleep(0.001)

        running = asyncio.ensure_future(admission.run(long_loop, nbytes=0))
        await wait_started(started)
        ran = threading.Event()
        queued = asyncio.ensure_future(admission.run(ran.set, nbytes=0))
        await asyncio.sleep(0.05)
        queued.cancel()
        running.cancel()
        for task in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        deadline = time.monotonic() + 5
        while admission.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert admission.running() == 0 and checks > 0
        assert not ran.is_set() and admission.small.queued == 0
        admission.close()

    asyncio.run(main())


def test_deadline_stops_work() -> None:
    async def main() -> None:
        admission = Admission(limits())

        def forever() -> None:
            while True:
                check_cancelled()
                time.sleep(0.001)

        with pytest.raises(DeadlineExceeded):
            await admission.run(forever, nbytes=0, deadline=time.monotonic() + 0.1)
        admission.close()

    asyncio.run(main())


def test_token_outside_cancellable_never_raises() -> None:
    check_cancelled()
    token = CancelToken()
    with cancellable(token):
        check_cancelled()
        token.cancel()
        with pytest.raises(Cancelled, match="cancelled by its caller"):
            check_cancelled()
    check_cancelled()


def test_a_cancelled_token_stops_a_kernel_in_its_chunk_loop() -> None:
    import numpy as np

    from lossd.kernels import evaluate

    tensors = {"logits": np.zeros((8, 4), np.float32), "labels": np.zeros(8, np.int64)}
    assert evaluate(tensors, ["cross_entropy"])["cross_entropy"].value == pytest.approx(np.log(4))
    token = CancelToken()
    token.cancel()
    with cancellable(token), pytest.raises(Cancelled):
        evaluate(tensors, ["cross_entropy"])


def test_with_no_queue_an_idle_lane_still_runs_work_and_a_busy_one_refuses() -> None:
    async def main() -> None:
        admission = Admission(limits(max_queued_requests=0))
        assert await admission.run(lambda: "ran", nbytes=0) == "ran"
        started, release, fn = blocker()
        running = asyncio.ensure_future(admission.run(fn, nbytes=0))  # type: ignore[arg-type]
        await wait_started(started)
        with pytest.raises(Overloaded, match="max_queued_requests"):
            await admission.run(lambda: "refused", nbytes=0)
        release.set()
        assert await running == "done"
        admission.close()

    asyncio.run(main())
