"""The shared row statistics (lossd.kernels.row_stats) against float64 torch, and what each request pays for.

row_statistics computes lse and max in cache-sized blocks, leaves argmax and
Σz to their first use and the entropy to whoever asks; these tests pin the
values (every dtype, layout, block boundary and edge value) and the passes.
"""

from __future__ import annotations

import pytest
import torch

from helpers import DTYPES, assert_close, tol
from lossd.kernels import batch as batch_module
from lossd.kernels import chunks, evaluate, input_diagnostics, row_stats
from lossd.kernels.batch import Batch
from lossd.kernels.dtypes import compute_dtype

INF, NAN = float("inf"), float("nan")


def reference(x: torch.Tensor, class_dim: int) -> dict[str, torch.Tensor]:
    """float64 lse, max, argmax, Σz and entropy of the same (upcast) values."""
    z = x.to(torch.float64).movedim(class_dim, -1)
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    return {
        "lse": torch.logsumexp(z, -1),
        "max": z.amax(-1),
        "argmax": z.argmax(-1),
        "sum": z.sum(-1),
        "entropy": -torch.where(p > 0, p * log_p, 0.0).sum(-1),
    }


def assert_stats(stats: row_stats.RowStats, x: torch.Tensor, class_dim: int, dtype: torch.dtype) -> None:
    ref = reference(x, class_dim)
    t = tol(dtype)
    finite = torch.isfinite(ref["lse"])
    assert stats.lse.dtype == compute_dtype(x.dtype) and stats.lse.shape == ref["lse"].shape
    assert_close(stats.lse[finite], ref["lse"][finite], **t, what="lse")
    assert torch.equal(stats.lse[~finite].isnan(), ref["lse"][~finite].isnan()), "lse: NaN rows differ"
    assert torch.equal(stats.max.to(torch.float64).nan_to_num(), ref["max"].nan_to_num()), "max"
    assert torch.equal(stats.argmax, ref["argmax"]), "argmax"
    size = x.to(torch.float64).abs().movedim(class_dim, -1).sum(-1)
    ok = torch.isfinite(size)
    assert bool(((stats.sum.to(torch.float64) - ref["sum"])[ok].abs() <= 1e-6 * size[ok] + 1e-6).all()), "sum"
    assert stats.entropy is not None
    assert_close(stats.entropy[finite], ref["entropy"][finite], rtol=t["rtol"], atol=t["atol"] * 10, what="entropy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [3.0, 300.0])  # within and beyond the unshifted range (|max| <= 60)
@pytest.mark.parametrize(("shape", "class_dim"), [((37, 11), 1), ((5, 7, 3), 1), ((2, 6, 129), 2), ((3, 1), 1)])
def test_values_match_float64_across_blocks(monkeypatch, dtype, scale, shape, class_dim):
    monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 40)  # several rows per block, several blocks per chunk
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    assert_stats(row_stats.row_statistics(x, class_dim, True), x, class_dim, dtype)


def test_edge_rows():
    x = torch.randn(6, 9) * 3
    x[0] = -INF  # lse = max = −inf, argmax 0, entropy −inf
    x[1, 4] = INF
    x[2, 3] = NAN
    x[3, ::2] = 1e4  # ties: the first index
    x[4, :5] = -INF
    x[5] = -1e4
    stats = row_stats.row_statistics(x, 1, True)
    assert stats.lse[0] == -INF and stats.max[0] == -INF and stats.argmax[0] == 0
    assert stats.lse[1] == INF and stats.argmax[1] == 4
    assert stats.lse[2].isnan() and stats.max[2].isnan() and stats.argmax[2] == 3
    assert stats.argmax[3] == 0
    ref = reference(x[3:], 1)
    assert_close(stats.lse[3:], ref["lse"], **tol(torch.float32))
    assert_close(stats.entropy[3:], ref["entropy"], rtol=2e-5, atol=2e-5)


def test_lazy_fields_are_computed_on_first_use_only(monkeypatch):
    calls = []
    real = row_stats._row_reduce
    monkeypatch.setattr(row_stats, "_row_reduce", lambda *a: calls.append(1) or real(*a))
    z, y = torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
    evaluate({"logits": z, "labels": y}, ["cross_entropy"])
    assert calls == []  # neither argmax nor Σz: cross-entropy reads lse and one score per row
    evaluate({"logits": z, "labels": y}, ["cross_entropy", "accuracy", "ece"])
    assert len(calls) == 1  # argmax, once, shared by accuracy and ece
    stats = row_stats.row_statistics(z, 1, False)
    assert stats.sum is stats.sum and stats.argmax is stats.argmax
    assert len(calls) == 3


def test_entropy_asked_later_reuses_the_stats(monkeypatch):
    z = torch.randn(16, 5)
    batch = Batch({"logits": z}, torch.device("cpu"))
    first = batch.row_stats("logits", 1)
    assert first.entropy is None
    again = batch.row_stats("logits", 1, with_entropy=True)
    assert again is first and again.entropy is not None
    assert_close(again.entropy, reference(z, 1)["entropy"], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocked", [False, True])
def test_the_passs_confidence_is_the_confidence_passs_bits(monkeypatch, dtype, blocked):
    """RowStats.top1 (the CPU row pass's own softmax) is bit for bit top1_confidence, edge rows and ties included."""
    if blocked:
        monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 40)
    x = torch.randn(23, 9, dtype=torch.float64) * 4
    x[0] = -INF
    x[1, 4] = INF
    x[2, 3] = NAN
    x[3, :2] = 7.0  # two tied top scores, the rest far below: confidence 1/2 exactly
    x[3, 2:] = -1e4
    x[4, :5] = -INF
    x[5] = 1e4
    x = x.to(dtype)
    stats = row_stats.row_statistics(x, 1, with_entropy=blocked)
    expected = row_stats.top1_confidence(x, 1)
    assert stats.top1 is not None and stats.top1.dtype == torch.float64
    assert torch.equal(stats.top1.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    assert stats.top1[3] == 0.5


@pytest.mark.parametrize("k", [10, 33, 1000])
def test_a_rows_confidence_and_lse_do_not_depend_on_its_batch_or_the_thread_count(k):
    """Monitoring bins many batches' rows in one softmax, and a local client's kernels run on other threads than the server's."""
    z = torch.randn(301, k) * 4
    z[5], z[5, :2] = -1e4, 3.0  # two tied top scores, the rest negligible: confidence 1/2 exactly
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = row_stats.row_statistics(z, 1, with_entropy=False)
        torch.set_num_threads(2)
        two = row_stats.row_statistics(z, 1, with_entropy=False)
    finally:
        torch.set_num_threads(threads)
    part = row_stats.row_statistics(z[3:10].clone(), 1, with_entropy=False)
    assert torch.equal(one.top1, two.top1) and torch.equal(one.lse, two.lse)
    assert torch.equal(part.top1, one.top1[3:10]) and torch.equal(part.lse, one.lse[3:10])
    assert one.top1[5] == 0.5


def test_one_pass_serves_the_logsumexp_and_the_confidence(monkeypatch):
    """Cross-entropy, ECE and a subscriber reading the confidence (monitoring) make one pass over the scores, in either order."""
    calls = []
    real = row_stats._row_pass
    monkeypatch.setattr(row_stats, "_row_pass", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(batch_module, "top1_confidence", lambda *a: pytest.fail("a pass of its own for the confidence"))
    monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 64)
    z, y = torch.randn(300, 10) * 3, torch.randint(0, 10, (300,))
    for functions in (["cross_entropy", "ece"], ["ece", "cross_entropy"]):
        calls.clear()
        out = evaluate({"logits": z, "labels": y}, functions)
        assert out.batch.top1_confidence("logits", 1) is out.batch.memoized_row_stats("logits", 1).top1
        assert calls == [1]


def test_row_stats_needs_values_or_a_source():
    with pytest.raises(ValueError, match="needs argmax and sum, or the source"):
        row_stats.RowStats(torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize(
    ("kind", "code"),
    [("logits", None), ("log_probs", "log_probs_as_logits"), ("probs", "probabilities_as_logits")],
)
def test_score_kind_diagnostics_read_the_shared_stats(monkeypatch, kind, code):
    """Log-probabilities and logits are told apart from lse and max alone; only probability-like rows pay for Σz."""
    calls = []
    real = row_stats._row_reduce
    monkeypatch.setattr(row_stats, "_row_reduce", lambda *a: calls.append(1) or real(*a))
    z = torch.randn(200, 7) * 3
    scores = {"logits": z, "log_probs": torch.log_softmax(z, 1), "probs": torch.softmax(z, 1)}[kind]
    out = evaluate({"logits": scores, "labels": torch.randint(0, 7, (200,))}, ["cross_entropy"])
    codes = [d.code for d in out.diagnostics]
    assert codes == ([code] if code else [])
    assert len(calls) == (1 if kind == "probs" else 0)


@pytest.mark.parametrize("k", [2, 3, 1000])
def test_the_lse_band_holds_for_every_distribution(k):
    """The necessary condition on lse holds for one-hot, uniform and random probability rows."""
    rows = torch.cat([torch.eye(k)[:2], torch.full((1, k), 1 / k), torch.softmax(torch.randn(20, k) * 5, 1)])
    stats = row_stats.row_statistics(rows, 1, False)
    assert input_diagnostics._lse_allows_probabilities(stats.lse, k)
    assert not input_diagnostics._lse_allows_probabilities(torch.log_softmax(torch.randn(5, k), 1).logsumexp(1), k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_count_nonfinite(dtype):
    x = torch.randn(1000).to(dtype)
    assert input_diagnostics.count_nonfinite(x) == (0, False)
    x[[3, 500, 999]] = torch.tensor([NAN, INF, -INF], dtype=dtype)
    assert input_diagnostics.count_nonfinite(x)[0] == 3  # the float16 limit flag only matters when all values are finite
    if dtype == torch.float16:
        y = torch.randn(1000).to(dtype)
        y[7] = -65504
        assert input_diagnostics.count_nonfinite(y) == (0, True)
