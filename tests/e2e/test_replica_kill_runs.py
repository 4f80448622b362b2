"""kill -9 of one of two replicas behind the repo's nginx during 8 concurrent ``client.run``s: nothing lost, nothing twice.

Each run sends its merged states with every update (``prior_states``), so a
replica holds no run state and losing one loses nothing but the calls it was
computing. Those calls fail: nginx answers INTERNAL for a request that reached
the dead replica (never replayed, see nginx.conf) and the client retries only
UNAVAILABLE by itself, so the run's caller retries the update. That retry is
safe: ``Run.update`` changes the run (states replaced, batch counted) only after
a successful answer, so a failed update left the run exactly as it was.

The reference is this process: ``lossd.kernels.Accumulator`` over the same
batches in the same order (the server's merges, bit for bit), and one
``lossd.kernels.evaluate`` of all the batches concatenated.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from integration.lossd_process import LossdProcess
from test_nginx import Nginx

from helpers import require_binary
from lossd.client import Client
from lossd.client.errors import InternalError, UnavailableError
from lossd.kernels import Accumulator, evaluate

pytestmark = pytest.mark.e2e

RUNS, BATCHES, ROWS, CLASSES = 8, 40, 256, 10
FUNCTIONS: list[Any] = ["cross_entropy", "accuracy", {"name": "ece", "params": {"n_bins": 15}}]
ATTEMPTS = 5  # per update, by the run's caller, on INTERNAL or UNAVAILABLE


def _batch(run: int, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([run, index])
    labels = rng.integers(0, CLASSES, ROWS)
    logits = rng.standard_normal((ROWS, CLASSES)).astype(np.float32)
    logits[np.arange(ROWS), labels] += 1.5  # better than chance: accuracy and ECE away from their trivial values
    return {"logits": logits, "labels": labels}


def _reference(run: int) -> tuple[dict[str, float], dict[str, float]]:
    """(accumulated batch by batch, evaluated once over every row) for one run, computed in this process."""
    accumulator = Accumulator(FUNCTIONS)
    batches = [_batch(run, i) for i in range(BATCHES)]
    for batch in batches:
        accumulator.add(batch)
    merged = accumulator.result()
    whole = evaluate({k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, FUNCTIONS)
    aliases = ("cross_entropy", "accuracy", "ece")
    return {a: merged[a].value for a in aliases}, {a: whole[a].value for a in aliases}


class Runs:
    """RUNS threads, each one ``client.run`` through nginx, retrying a failed update as the module docstring says."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.done = 0  # updates answered, over every run
        self.failures: list[str] = []  # the status of each failed attempt
        self.results: dict[int, Any] = {}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"run-{i}") for i in range(RUNS)]

    def _run(self, index: int) -> None:
        try:
            with Client(self.address, timeout=60) as client:
                run = client.run(FUNCTIONS)
                for b in range(BATCHES):
                    batch = _batch(index, b)
                    for attempt in range(ATTEMPTS):
                        try:
                            run.update(batch)
                            break
                        except (InternalError, UnavailableError) as exc:  # the killed replica's in-flight call
                            with self._lock:
                                self.failures.append(type(exc).__name__)
                            assert run.batches == b, "a failed update changed the run"
                            if attempt == ATTEMPTS - 1:
                                raise
                            time.sleep(0.1)
                    with self._lock:
                        self.done += 1
                self.results[index] = (run.result(), run.batches)
        except BaseException as exc:  # reported by the test, with the run it came from
            self.errors.append(exc)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a run did not finish"


def _evaluations_of(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("lossd_evaluations_total{"))


def test_kill_9_of_one_replica_during_8_runs_gives_exact_totals(tmp_path: Path) -> None:
    binary = require_binary("nginx")
    references = {i: _reference(i) for i in range(RUNS)}
    with LossdProcess() as first, LossdProcess() as second:
        nginx = Nginx(binary, tmp_path, [first, second])  # type: ignore[list-item]  # plaintext replicas
        try:
            runs = Runs(f"127.0.0.1:{nginx.grpc_port}")
            runs.start()
            deadline = time.monotonic() + 120
            while runs.done < RUNS * BATCHES // 3:  # a third of the way in: every run is mid-way
                assert time.monotonic() < deadline and not runs.errors, f"the runs stalled before the kill: {runs.errors}"
                time.sleep(0.01)
            served_by_victim = _evaluations_of(first.url)
            at_kill = runs.done
            os.kill(first.pid, signal.SIGKILL)
            runs.join(240)
            survivor_served = _evaluations_of(second.url)
        finally:
            nginx.stop()
    assert not runs.errors, runs.errors
    assert served_by_victim > 0, "nginx never sent a call to the replica that was killed"
    assert first.process.returncode == -signal.SIGKILL
    print(
        f"\nkilled replica 1 after {at_kill} of {RUNS * BATCHES} updates (it had served {served_by_victim:.0f}); "
        f"{len(runs.failures)} failed attempts retried by the callers ({sorted(set(runs.failures))}); survivor served {survivor_served:.0f}"
    )
    for i in range(RUNS):
        result, batches = runs.results[i]
        merged, whole = references[i]
        assert batches == result.batches == BATCHES, f"run {i}: {batches} batches counted, expected {BATCHES}"
        assert result["cross_entropy"].denominator == BATCHES * ROWS, f"run {i}: rows counted twice or lost"
        got = {alias: result[alias].value for alias in merged}
        assert got == merged, f"run {i}: {got} != the in-process accumulation {merged}"  # bit for bit
        assert got == pytest.approx(whole, rel=1e-9, abs=1e-12), f"run {i}: {got} != one evaluation of every row {whole}"
        if i == 0:
            print(f"run 0: lossd {got}; in-process accumulation {merged}; one evaluation of all rows {whole}")


def test_a_failed_update_changes_nothing_and_its_retry_counts_once() -> None:
    """The idempotence the test above relies on: an update refused by an unreachable replica, then retried."""
    with LossdProcess() as server:
        address = server.grpc_address
        with Client(address, timeout=30) as client:
            run = client.run(FUNCTIONS)
            run.update(_batch(0, 0))
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(30)
    with Client(address, timeout=5, attempts=1) as client:
        run.client = client
        with pytest.raises(UnavailableError):
            run.update(_batch(0, 1))
        assert run.batches == 1
    with LossdProcess() as server, Client(server.grpc_address, timeout=30) as client:
        run.client = client  # a replica that never saw the run: the states travel with the update
        for b in range(1, BATCHES):
            run.update(_batch(0, b))
        result = run.result()
    merged, _ = _reference(0)
    assert run.batches == result.batches == BATCHES
    assert {alias: result[alias].value for alias in merged} == merged
