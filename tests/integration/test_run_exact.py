"""Exact AUROC/AP in runs: never resent, so wire bytes and time grow linearly with the batches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
from integration.conftest import ServerThread, serving_with
from integration.wire_recording import RecordingInterceptor
from sklearn.metrics import average_precision_score, roc_auc_score

from lossd.client import AsyncClient, Client
from lossd.client.errors import InvalidArgumentError

ROWS = 1000


def binary(seed: int, n: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random(n) < 0.4).astype(np.float64)
    return {"logits": rng.standard_normal(n) + targets, "targets": targets}


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[ServerThread, RecordingInterceptor]]:
    yield from serving_with(RecordingInterceptor())


def test_exact_values_match_sklearn_over_every_batch(address: str) -> None:
    batches = [binary(seed, 300) for seed in range(7)]
    scores = np.concatenate([b["logits"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    with Client(address, timeout=30) as client:
        run = client.run(["auroc", "average_precision", {"name": "auroc", "params": {"bins": 64}, "alias": "binned"}])
        for batch in batches:
            out = run.update(batch)
        assert "auroc" not in out and "average_precision" not in out  # exact values are computed when asked
        assert list(out) == ["binned"]  # a bounded state: over every batch at each update
        result = run.result()
        assert result.batches == run.batches == 7
        assert result["auroc"].value == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
        assert result["average_precision"].value == pytest.approx(average_precision_score(targets, scores), abs=1e-12)
        assert result["auroc"].value == run.result()["auroc"].value  # a second ask reuses the merge
        run.update(binary(99, 300))  # and a later update invalidates it
        more = binary(99, 300)
        all_scores, all_targets = np.concatenate([scores, more["logits"]]), np.concatenate([targets, more["targets"]])
        assert run.result()["auroc"].value == pytest.approx(roc_auc_score(all_targets, all_scores), abs=1e-12)


def test_a_refused_update_changes_nothing(address: str) -> None:
    """The run changes only after a successful answer: a failed call is neither lost nor counted twice."""
    good = [binary(seed, 200) for seed in range(4)]
    with Client(address, timeout=30) as client:
        run = client.run("auroc")
        for i, batch in enumerate(good):
            run.update(batch)
            if i == 2:
                with pytest.raises(InvalidArgumentError):
                    run.update({"logits": batch["logits"][:5], "targets": batch["targets"][:4]})
        scores = np.concatenate([b["logits"] for b in good])
        targets = np.concatenate([b["targets"] for b in good])
        assert run.batches == 4
        assert run.result()["auroc"].value == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_wire_bytes_grow_linearly(recorded: tuple[ServerThread, RecordingInterceptor]) -> None:
    server, recorder = recorded
    batches = 200
    with Client(server.address, timeout=60) as client:
        run = client.run(["auroc", "average_precision"])
        recorder.clear()
        for seed in range(batches):
            run.update(binary(seed))
        updates = recorder.of("Evaluate")
        value = run.result()["auroc"].value
        finalize = recorder.of("Finalize")
    one = updates[0]
    assert len(updates) == batches and max(updates[2:]) <= 1.02 * one  # no update carries the growing scores
    assert sum(updates) == pytest.approx(batches * one, rel=0.10)
    scores_bytes = batches * ROWS * 2 * 8  # scores and labels, float64, per exact function
    assert len(finalize) == 1 and finalize[0] <= 2 * scores_bytes * 1.05  # sent once, at the end
    assert 0.5 < value < 1.0


def test_update_time_stays_flat(address: str) -> None:
    """The last updates cost what the first ones did (no growing state resent); the bench measures this too."""
    with Client(address, timeout=60) as client:
        run = client.run("auroc")
        seconds = []
        for seed in range(120):
            batch = binary(seed)
            start = time.perf_counter()
            run.update(batch)
            seconds.append(time.perf_counter() - start)
        run.result()
    first, last = sorted(seconds[:20])[10], sorted(seconds[-20:])[10]  # medians: robust to a busy machine
    assert last <= 1.5 * first + 0.005, (first, last)  # 5 ms of slack for a busy shared machine


def test_async_run_merges_when_asked(address: str) -> None:
    batches = [binary(seed, 250) for seed in range(5)]

    async def main() -> tuple[float, float]:
        async with AsyncClient(address, timeout=30) as client:
            run = client.run("auroc")
            for batch in batches:
                await run.update(batch)
            with pytest.raises(ValueError, match="await run.merge"):
                run.result()
            merged = await run.merge()
            return merged["auroc"].value, run.result()["auroc"].value

    merged, cached = asyncio.run(main())
    scores = np.concatenate([b["logits"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert merged == cached == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
