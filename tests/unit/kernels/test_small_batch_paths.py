"""The small-request fast paths give exactly what the general paths give.

A tensor of one cache block skips the block loop and its output buffers,
labels all in [0, K) skip the mask arithmetic, and labels read by several
functions are checked once per request: each must leave every value,
diagnostic and error message as the general path makes them.
"""

from __future__ import annotations

import pytest
import torch

from lossd.kernels import chunks, evaluate
from lossd.kernels.errors import InvalidInput
from lossd.kernels.input_diagnostics import count_nonfinite
from lossd.kernels.row_stats import row_entropy, row_statistics, top1_confidence


def _scores(n: int, k: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    assert bool(same.all()), f"{what}: first difference at flat index {int(torch.nonzero(~same.reshape(-1))[0][0])}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("large", [False, True])
def test_one_block_row_statistics_equal_blocked_ones(dtype: torch.dtype, large: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each block decides alone whether its logsumexp shifts by the row max (some row max beyond ±60):
    # scores that make every block decide alike, so that whole and blocked passes compute the same.
    z = _scores(64, 10, dtype, 300.0 if large else 4.0)
    if large:
        z[3] = float("-inf")
        z[5, 2] = float("nan")
    assert chunks.only_block(z, 1) is z
    whole = row_statistics(z, 1, True)
    whole_parts = (whole.lse, whole.max, whole.entropy, whole.argmax, whole.sum, row_entropy(z, 1), top1_confidence(z, 1))
    # Blocks of 7 rows: the loop and its output buffers, over the same rows.
    monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 70)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 70)
    assert chunks.only_block(z, 1) is None
    blocked = row_statistics(z, 1, True)
    blocked_parts = (blocked.lse, blocked.max, blocked.entropy, blocked.argmax, blocked.sum, row_entropy(z, 1), top1_confidence(z, 1))
    names = ("lse", "max", "entropy", "argmax", "sum", "row_entropy", "top1_confidence")
    for name, a, b in zip(names, whole_parts, blocked_parts, strict=True):
        assert a is not None and b is not None
        _assert_same(a, b, name)


def test_only_block_refuses_what_cache_blocks_would_split() -> None:
    rows = chunks.CACHE_BLOCK_ELEMENTS // 1000
    assert chunks.only_block(torch.zeros(rows, 1000), 1) is not None
    assert chunks.only_block(torch.zeros(rows + 1, 1000), 1) is None
    assert chunks.only_block(torch.zeros(4, 3, 2), 1) is None  # classes not last: blocks are copies
    assert chunks.only_block(torch.zeros(4, 3), 0) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_count_nonfinite_counts_and_float16_limit(dtype: torch.dtype) -> None:
    t = torch.zeros(5, 4, dtype=dtype)
    assert count_nonfinite(t) == (0, False)
    t[1, 1], t[2, 3], t[4, 0] = float("nan"), float("inf"), float("-inf")
    assert count_nonfinite(t)[0] == 3
    limit = torch.zeros(3, dtype=dtype)
    limit[1] = -65504.0
    assert count_nonfinite(limit) == (0, dtype == torch.float16)


def test_labels_outside_the_classes_still_refused_with_the_first_bad_one() -> None:
    z = torch.zeros(4, 3)
    y = torch.tensor([0, 5, -100, 7])
    with pytest.raises(InvalidInput, match=r"got 5 at flat index 1 \(2 out-of-range labels in all\)") as info:
        evaluate({"logits": z, "labels": y}, ["cross_entropy"])
    assert [d.code for d in info.value.diagnostics] == ["labels_out_of_range"]


@pytest.mark.parametrize("ignore_index", [-100, 1, 3])
def test_ignore_index_inside_or_outside_the_labels_range(ignore_index: int) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 1, 1, 1])
    result = evaluate({"logits": z, "labels": y}, [{"name": "cross_entropy", "params": {"ignore_index": ignore_index}}])
    keep = y != ignore_index
    expected = torch.nn.functional.cross_entropy(z[keep].double(), y[keep])
    assert result["cross_entropy"].value == pytest.approx(float(expected), rel=1e-6)
    assert result["cross_entropy"].denominator == float(keep.sum())


def test_labels_checked_once_still_diagnose_every_function() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 3, generator=g)
    y = torch.tensor([0, -100, -100, -100, -100, -100, 2, 1])
    ev = evaluate({"logits": z, "labels": y}, ["cross_entropy", "accuracy", "ece"])
    ignored = [d.function for d in ev.diagnostics if d.code == "ignored_fraction"]
    assert ignored == ["cross_entropy", "accuracy", "ece"]
    keep = y != -100
    expected = torch.nn.functional.cross_entropy(z[keep].double(), y[keep])
    assert ev["cross_entropy"].value == pytest.approx(float(expected), rel=1e-6)
    assert ev["accuracy"].value == pytest.approx(float((z[keep].argmax(1) == y[keep]).double().mean()))
    assert ev["ece"].denominator == 3.0
