"""The bin rule on the edges themselves (CATALOGUE.md): bin b covers (b/B, (b+1)/B], 0 in bin 0, 1.0 in the last.

Libraries disagree on edges, so the rule is tested directly: for every edge
b/B of B in {2, 4, 8, 10, 15}, a confidence equal to it in its own dtype
(float32 or float64) lands in bin b − 1, for the top-label, positive-class
and classwise scopes, with ``input_kind=probs`` (binned as given, never
through log and exp) and with logits whose confidence is a representable
edge (tied classes: 1/m).
"""

from __future__ import annotations

import math

import pytest
import torch

from lossd.kernels import evaluate
from lossd.kernels.calibration.bins import bin_index

EDGE_BINS = (2, 4, 8, 10, 15)
DTYPES = (torch.float32, torch.float64)
K_TOP = 16  # columns of the top-label rows: room for the rest of the mass in pieces <= the confidence


def edge(b: int, n_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """The edge b/B in ``dtype`` (the nearest value: 0.1 is not exact in binary)."""
    return torch.tensor(b / n_bins, dtype=torch.float64).to(dtype)


def expected_bin(b: int) -> int:
    """The catalogue's bin of a confidence exactly b/B: b − 1, and 0 for 0."""
    return max(b - 1, 0)


def bins_of(tensors: dict, name: str, **params: object) -> torch.Tensor:
    """The summed (n_b, Σ conf, Σ correct) state of one evaluation."""
    out = evaluate(tensors, [{"name": name, "params": params}], return_state=True)
    state = out[name].state
    assert state is not None
    return state.fields["bins"]


def assert_distribution(rows: torch.Tensor) -> None:
    """The rows sum to 1 up to their dtype's rounding, so they are binned as given (no renormalization)."""
    total = rows.to(torch.float64).sum(dim=1)
    assert bool(((total - 1).abs() <= rows.shape[1] * torch.finfo(rows.dtype).eps).all()), total


def top_label_rows(n_bins: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """One row per edge b/B (b = 1..B) whose top-1 probability is that edge, with the b of each row."""
    rows, bs = [], list(range(1, n_bins + 1))
    for b in bs:
        c = float(edge(b, n_bins, dtype))
        pieces = math.floor((1 - c) / c) + 1 if c < 1 else 0  # each piece strictly below c
        row = torch.zeros(K_TOP, dtype=torch.float64)
        row[0] = c
        if pieces:
            row[1 : 1 + pieces] = (1 - c) / pieces
        rows.append(row.to(dtype))
    out = torch.stack(rows)
    assert bool((out[:, 0] == out.max(dim=1).values).all())
    assert_distribution(out)
    return out, bs


def binary_rows(n_bins: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """[B+1, 2] rows (1 − b/B, b/B), both entries edges given in ``dtype``, for b = 0..B."""
    bs = list(range(n_bins + 1))
    rows = torch.stack([torch.stack([edge(n_bins - b, n_bins, dtype), edge(b, n_bins, dtype)]) for b in bs])
    assert_distribution(rows)
    return rows, bs


def counts_for(bs: list[int], n_bins: int) -> torch.Tensor:
    want = torch.zeros(n_bins, dtype=torch.float64)
    for b in bs:
        want[expected_bin(b)] += 1
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_bins", EDGE_BINS)
def test_top_label_probabilities_on_every_edge(n_bins: int, dtype: torch.dtype) -> None:
    rows, bs = top_label_rows(n_bins, dtype)
    labels = torch.zeros(len(bs), dtype=torch.int64)
    bins = bins_of({"logits": rows, "labels": labels}, "ece", n_bins=n_bins, input_kind="probs")
    assert torch.equal(bins[:, 0], counts_for(bs, n_bins)), bins[:, 0]
    # Binned as given: each bin's Σ confidence is exactly the edge it holds, not exp(log(edge)).
    for b in bs:
        assert float(bins[expected_bin(b), 1]) == float(edge(b, n_bins, dtype)), (b, float(bins[expected_bin(b), 1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_bins", EDGE_BINS)
def test_positive_class_probabilities_on_every_edge(n_bins: int, dtype: torch.dtype) -> None:
    rows, bs = binary_rows(n_bins, dtype)
    want = counts_for(bs, n_bins)
    # [N] probabilities of class 1 with 0/1 targets, and [N, 2] rows with labels: the same bins.
    targets = (torch.arange(len(bs)) % 2).to(dtype)
    flat = bins_of({"logits": rows[:, 1], "targets": targets}, "ece", n_bins=n_bins, input_kind="probs", scope="positive_class")
    pairs = bins_of({"logits": rows, "labels": targets.to(torch.int64)}, "ece", n_bins=n_bins, input_kind="probs", scope="positive_class")
    assert torch.equal(flat[:, 0], want), flat[:, 0]
    assert torch.equal(pairs, flat)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_bins", EDGE_BINS)
def test_classwise_probabilities_on_every_edge(n_bins: int, dtype: torch.dtype) -> None:
    rows, bs = binary_rows(n_bins, dtype)
    labels = torch.arange(len(bs)) % 2
    bins = bins_of({"logits": rows, "labels": labels}, "ece", n_bins=n_bins, input_kind="probs", scope="classwise")
    assert torch.equal(bins[1, :, 0], counts_for(bs, n_bins)), bins[1, :, 0]
    assert torch.equal(bins[0, :, 0], counts_for([n_bins - b for b in bs], n_bins)), bins[0, :, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_bins", EDGE_BINS)
def test_bin_index_of_every_edge_in_its_own_precision(n_bins: int, dtype: torch.dtype) -> None:
    edges = torch.stack([edge(b, n_bins, dtype) for b in range(n_bins + 1)])
    got = bin_index(edges.to(torch.float64), n_bins, dtype)
    assert got.tolist() == [expected_bin(b) for b in range(n_bins + 1)]
    # The next value above an edge opens the bin above it (except above 1.0, which is the last bin's).
    above = torch.nextafter(edges[:-1], torch.ones_like(edges[:-1]))
    assert bin_index(above.to(torch.float64), n_bins, dtype).tolist() == list(range(n_bins))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_bins", (2, 4, 8))
def test_tied_logits_give_an_exact_edge(n_bins: int, dtype: torch.dtype) -> None:
    """m tied top logits (the others far below) give the confidence 1/m exactly: on the edge, in the bin below."""
    ties = [m for m in (1, 2, 4, 8) if n_bins % m == 0]
    rows = torch.full((len(ties), 8), -1e4, dtype=dtype)
    for i, m in enumerate(ties):
        rows[i, :m] = 0.0
    labels = torch.zeros(len(ties), dtype=torch.int64)
    top = bins_of({"logits": rows, "labels": labels}, "ece", n_bins=n_bins)
    assert torch.equal(top[:, 0], counts_for([n_bins // m for m in ties], n_bins)), top[:, 0]
    assert float(top[:, 1].sum()) == sum(1 / m for m in ties)
    # Two tied classes: p = 1/2 for both, positive-class and classwise alike.
    pair = torch.zeros(3, 2, dtype=dtype)
    y = torch.tensor([0, 1, 1])
    half = n_bins // 2 - 1
    assert float(bins_of({"logits": pair, "labels": y}, "ece", n_bins=n_bins, scope="positive_class")[half, 0]) == 3
    assert torch.equal(
        bins_of({"logits": pair, "labels": y}, "ece", n_bins=n_bins, scope="classwise")[:, half, 0], torch.tensor([3.0, 3.0])
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_whose_confidence_is_not_representable_stay_on_their_edge(dtype: torch.dtype) -> None:
    """m = 5 or 10 tied top logits: the confidence is the compute dtype's nearest 1/m, which meets that dtype's edge m/10: bin below."""
    rows = torch.full((2, 12), -1e4, dtype=dtype)
    rows[0, :5], rows[1, :10] = 0.0, 0.0
    top = bins_of({"logits": rows, "labels": torch.zeros(2, dtype=torch.int64)}, "ece", n_bins=10)
    assert torch.equal(top[:, 0], counts_for([2, 1], 10)), top[:, 0]


def test_zero_and_one_are_in_the_first_and_last_bins() -> None:
    p = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    bins = bins_of(
        {"logits": p, "targets": torch.tensor([0.0, 1.0, 1.0, 0.0])}, "ece", n_bins=10, input_kind="probs", scope="positive_class"
    )
    assert bins[0, 0] == 2 and bins[9, 0] == 2 and float(bins[1:9, 0].sum()) == 0
