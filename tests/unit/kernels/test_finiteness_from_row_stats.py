"""The nan_or_inf check of scores rides on their row statistics: no pass of its own when they prove the scores finite.

The CPU row pass (torch's log_softmax kernel) proves every score finite for
free; only when it cannot does the full check run, deferred so that the
diagnostics, their order and their messages stay those of an immediate check.
"""

from __future__ import annotations

import pytest
import torch

from lossd.kernels import chunks, evaluate, input_diagnostics
from lossd.kernels.errors import InvalidInput
from lossd.kernels.row_stats import row_entropy, row_statistics

CPU = torch.device("cpu")


def _scores(n: int, k: int, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(n: int, k: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def full_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full nan_or_inf scans (count_nonfinite) made by input_diagnostics."""
    calls: list[int] = []
    real = input_diagnostics.count_nonfinite

    def counting(t: torch.Tensor) -> tuple[int, bool]:
        calls.append(t.numel())
        return real(t)

    monkeypatch.setattr(input_diagnostics, "count_nonfinite", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_scores_need_no_full_check(dtype: torch.dtype, full_checks: list[int]) -> None:
    n, k = 1100, 1000  # two cache blocks
    out = evaluate({"logits": _scores(n, k, dtype=dtype), "labels": _labels(n, k)}, ["cross_entropy", "accuracy"], device=CPU)
    assert full_checks == []
    assert out.diagnostics == []
    z = _scores(n, k, dtype=dtype).double()
    expected = torch.nn.functional.cross_entropy(z, _labels(n, k))
    assert out["cross_entropy"].value == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("at", [(0, 0), (1050, 3), (1099, 999)])
def test_a_nonfinite_score_anywhere_gets_the_full_check(value: float, at: tuple[int, int], full_checks: list[int]) -> None:
    n, k = 1100, 1000
    z = _scores(n, k)
    z[at] = value
    stats = row_statistics(z, 1, False)
    assert stats.finite is False
    out = evaluate({"logits": z, "labels": _labels(n, k)}, ["cross_entropy"], device=CPU)
    assert full_checks == [n * k]
    assert [(d.code, d.message) for d in out.diagnostics] == [("nan_or_inf", "tensor 'logits' holds 1 NaN or infinite values")]
    if value == float("-inf"):  # a −inf logit is a class of probability 0: the loss stays finite unless it is the label's
        assert stats.lse.isfinite().all()


def test_the_deferred_check_keeps_its_place_among_the_diagnostics() -> None:
    # class_imbalance (of the labels) comes after the logits' nan_or_inf, as when the logits were checked at once.
    n, k = 400, 5
    z = _scores(n, k)
    z[7, 1] = float("nan")
    y = torch.zeros(n, dtype=torch.int64)
    y[:2] = 1  # class 1 holds 0.5% of the labels
    out = evaluate({"logits": z, "labels": y}, ["cross_entropy"], device=CPU)
    assert [d.code for d in out.diagnostics] == ["nan_or_inf", "class_imbalance"]


def test_an_error_carries_the_deferred_finding() -> None:
    z = _scores(200, 4)
    z[3, 0] = float("inf")
    y = _labels(200, 4)
    y[9] = 4  # out of range
    with pytest.raises(InvalidInput) as caught:
        evaluate({"logits": z, "labels": y}, ["cross_entropy"], device=CPU)
    assert [d.code for d in caught.value.diagnostics] == ["nan_or_inf", "labels_out_of_range"]


def test_float16_is_checked_in_full_for_its_limit(full_checks: list[int]) -> None:
    z = _scores(100, 8).to(torch.float16)
    z[2, 2] = 65504.0
    out = evaluate({"logits": z, "labels": _labels(100, 8)}, ["cross_entropy"], device=CPU)
    assert full_checks == [800]
    assert [d.code for d in out.diagnostics] == ["precision_loss"]


@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_row_pass_matches_float64_references(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 64 * 500)  # blocks of 64 rows: the blocked path and its buffers
    z = _scores(300, 500, scale)
    z[5, 7] = float("-inf")
    stats = row_statistics(z, 1, True)
    z64 = z.double()
    lse = torch.logsumexp(z64, 1)
    torch.testing.assert_close(stats.lse.double(), lse, rtol=2e-7, atol=0)
    assert torch.equal(stats.max, z.amax(1))
    p = torch.softmax(z64, 1)
    reference = -(p * torch.log_softmax(z64, 1)).nan_to_num(0.0).sum(1)  # 0·log 0 = 0
    assert stats.entropy is not None
    torch.testing.assert_close(stats.entropy.double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.entropy, row_entropy(z, 1))  # the later pass, bit for bit
    assert bool((stats.entropy >= 0).all()) and not bool(torch.signbit(stats.entropy).any())  # no −0.0 for one-hot rows


def test_odd_rows_take_the_values_torch_defines_whatever_their_block(monkeypatch: pytest.MonkeyPatch) -> None:
    z = _scores(50, 6)
    z[3] = float("-inf")
    z[4, 1] = float("nan")
    z[5, 2] = float("inf")
    whole = row_statistics(z, 1, True)
    monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 24)  # blocks of 4 rows
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 24)
    blocked = row_statistics(z, 1, True)
    assert whole.lse[3] == float("-inf") and whole.lse[4].isnan() and whole.lse[5] == float("inf")
    for a, b in ((whole.lse, blocked.lse), (whole.entropy, blocked.entropy)):
        assert a is not None and b is not None
        assert bool(((a == b) | (a.isnan() & b.isnan())).all())
    finite_rows = torch.isfinite(z).all(1)
    torch.testing.assert_close(whole.lse[finite_rows].double(), torch.logsumexp(z.double(), 1)[finite_rows], rtol=2e-7, atol=0)
