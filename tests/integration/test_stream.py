"""Exact merging end to end: a batch split at random points gives the unsplit values, however it travels."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from helpers import assert_close, random_splits
from lossd.client import Client, EvaluationResult

N, K = 301, 7
FUNCTIONS = [
    "cross_entropy",
    {"name": "cross_entropy", "params": {"label_smoothing": 0.1, "weight": [1, 2, 1, 1, 0.5, 1, 3]}, "alias": "ce_weighted"},
    "accuracy",
    "top_k_accuracy:k=3",
    "ece:n_bins=10",
    "brier",
    "confusion_matrix",
    {"name": "mse", "inputs": {"predictions": "y_pred", "targets": "y_true"}},
    {"name": "r2", "inputs": {"predictions": "y_pred", "targets": "y_true"}},
]
RTOL = 1e-9


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, K, N)
    labels[rng.choice(N, 20, replace=False)] = -100  # ignored rows change the denominators
    return {
        "logits": (rng.standard_normal((N, K)) * 3).astype(np.float32),
        "labels": labels,
        "y_pred": rng.standard_normal(N).astype(np.float32),
        "y_true": rng.standard_normal(N).astype(np.float32),
    }


@pytest.fixture(scope="module")
def whole(client: Client, batch: dict) -> EvaluationResult:
    return client.evaluate(batch, FUNCTIONS)


def parts_of(batch: dict, seed: int, parts: int = 5) -> list[dict[str, np.ndarray]]:
    return [{k: v[s] for k, v in batch.items()} for s in random_splits(N, parts, np.random.default_rng(seed))]


def assert_same(merged: EvaluationResult, whole: EvaluationResult) -> None:
    assert list(merged) == list(whole)
    for alias, w in whole.items():
        m = merged[alias]
        assert set(m.values) == set(w.values) and set(m.tensors) == set(w.tensors), alias
        for key, value in w.values.items():
            if math.isnan(value):
                assert math.isnan(m.values[key]), f"{alias}.{key}"
            else:
                assert_close(m.values[key], value, rtol=RTOL, atol=1e-12, what=f"{alias}.{key}")
        for key, t in w.tensors.items():
            assert_close(m.tensors[key], t, rtol=RTOL, atol=1e-12, what=f"{alias}.{key}")
        assert m.denominator == w.denominator and m.denominator_kind == w.denominator_kind, alias


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_unsplit(client: Client, batch: dict, whole: EvaluationResult, seed: int) -> None:
    merged = client.evaluate_stream(iter(parts_of(batch, seed)), FUNCTIONS)
    assert merged.batches == 5
    assert_same(merged, whole)


@pytest.mark.parametrize("seed", [3, 4])
def test_run_equals_unsplit(client: Client, batch: dict, whole: EvaluationResult, seed: int) -> None:
    run = client.run(FUNCTIONS, tags={"model": "merge-test"})
    for part in parts_of(batch, seed):
        run.update(part)
    assert run.batches == 5
    assert_same(run.result(), whole)
    # the run's states finalize to the same values
    assert_same(client.finalize(run.states()), whole)


def test_finalize_of_shard_states_equals_unsplit(client: Client, batch: dict, whole: EvaluationResult) -> None:
    shards = [client.evaluate(part, FUNCTIONS, return_state=True).states() for part in parts_of(batch, 5, parts=4)]
    assert_same(client.finalize(shards), whole)


def test_chunked_stream_equals_unsplit(address: str, batch: dict, whole: EvaluationResult) -> None:
    sizes = [sum(v.nbytes for v in part.values()) for part in parts_of(batch, 6, parts=2)]
    assert min(sizes) > 4 * 1024  # so each batch goes in several parts sharing one batch_id
    with Client(address, timeout=30, chunk_bytes=1024) as chunky:
        merged = chunky.evaluate_stream(iter(parts_of(batch, 6, parts=2)), FUNCTIONS)
    assert_same(merged, whole)


def test_large_unary_evaluate_goes_in_parts_with_the_same_values(address: str) -> None:
    """A batch over chunk_bytes is sent through EvaluateStream in parts; the values equal the in-process ones."""
    from lossd.kernels import evaluate as evaluate_in_process

    rng = np.random.default_rng(7)
    tensors = {"logits": rng.standard_normal((300, 7), dtype=np.float32), "labels": rng.integers(0, 7, 300)}
    functions = ["cross_entropy", "accuracy", "ece"]
    with Client(address, chunk_bytes=1024) as client:
        chunked = client.evaluate(tensors, functions)
        per_element = client.evaluate(tensors, ['cross_entropy:reduction="none"'])  # never split
    assert chunked.batches == 1  # parts of one batch count once
    whole = evaluate_in_process(tensors, functions)
    for alias in functions:
        assert chunked[alias].value == pytest.approx(whole[alias].value, rel=1e-9)
    assert per_element["cross_entropy"].tensors["value"].shape == (300,)
