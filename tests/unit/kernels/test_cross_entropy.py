"""cross_entropy against torch.nn.functional.cross_entropy and a float64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import InvalidInput, evaluate


def ce(tensors, **params):
    out = evaluate(tensors, [{"name": "cross_entropy", "params": params}])
    r = out["cross_entropy"]
    return (r.tensors["value"] if params.get("reduction") == "none" else r.value), out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (257, 3), (5, 7, 3), (4, 3, 2, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch(dtype, shape, reduction):
    z = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, shape[1], shape[:1] + shape[2:])
    got, _ = ce({"logits": z, "labels": y}, reduction=reduction)
    ref = F.cross_entropy(z.double(), y, reduction=reduction)
    assert_close(got, ref.numpy(), **tol(dtype))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_ignore_index_smoothing(smoothing, weighted, reduction):
    z = torch.randn(33, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (33,))
    y[::4] = -100
    w = torch.rand(6, dtype=torch.float64) + 0.1
    params = dict(label_smoothing=smoothing, reduction=reduction, **({"weight": w.tolist()} if weighted else {}))
    got, _ = ce({"logits": z, "labels": y}, **params)
    ref = F.cross_entropy(z, y, weight=w if weighted else None, label_smoothing=smoothing, reduction=reduction)
    assert_close(got, ref.numpy(), rtol=1e-9, atol=1e-12)


def test_custom_ignore_index_and_all_ignored():
    z = torch.randn(8, 4, dtype=torch.float64)
    y = torch.full((8,), 7)
    got, out = ce({"logits": z, "labels": y}, ignore_index=7)
    assert got != got  # NaN
    assert out["cross_entropy"].denominator == 0
    assert "all_ignored" in [d.code for d in out.diagnostics]


def test_smoothing_others_matches_formula():
    z = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (20,))
    eps = 0.2
    q = torch.full((20, 5), eps / 4, dtype=torch.float64)
    q[torch.arange(20), y] = 1 - eps
    ref = -(q * torch.log_softmax(z, 1)).sum(1).mean()
    got, _ = ce({"logits": z, "labels": y}, label_smoothing=eps, smoothing_mode="others")
    assert_close(got, ref.item(), rtol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_soft_targets(smoothing):
    z = torch.randn(9, 4, 3, dtype=torch.float64)
    q = torch.softmax(torch.randn(9, 4, 3, dtype=torch.float64), 1)
    w = torch.rand(4, dtype=torch.float64)
    got, _ = ce({"logits": z, "target_probs": q}, label_smoothing=smoothing, weight=w.tolist())
    assert_close(got, F.cross_entropy(z, q, weight=w, label_smoothing=smoothing).item(), rtol=1e-10)


def test_input_kinds_give_the_same_loss():
    z = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    ref = F.cross_entropy(z, y).item()
    lp = torch.log_softmax(z, 1)
    assert_close(ce({"logits": lp, "labels": y}, input_kind="log_probs")[0], ref, rtol=1e-10)
    assert_close(ce({"logits": lp.exp(), "labels": y}, input_kind="probs")[0], ref, rtol=1e-10)


def test_probabilities_as_logits_is_diagnosed():
    p = torch.softmax(torch.randn(10, 4), 1)
    _, out = ce({"logits": p, "labels": torch.randint(0, 4, (10,))})
    assert "probabilities_as_logits" in [d.code for d in out.diagnostics]
    _, clean = ce({"logits": torch.randn(10, 4) * 3, "labels": torch.randint(0, 4, (10,))})
    assert clean.diagnostics == []


def test_extreme_logits_are_finite():
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
    y = torch.tensor([1, 1])
    got, _ = ce({"logits": z, "labels": y})
    assert_close(got, F.cross_entropy(z, y).item(), rtol=1e-6)


@pytest.mark.parametrize("params", [{}, {"label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5]}])
def test_merge_is_exact(params):
    z = torch.randn(101, 3, 4, dtype=torch.float32)
    y = torch.randint(0, 3, (101, 4))
    y[5] = -100
    assert_merge_exact({"logits": z, "labels": y}, {"name": "cross_entropy", "params": params}, parts=5)


@pytest.mark.parametrize(
    "tensors, params, field, match",
    [
        ({"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 3, 0])}, {}, "tensors.labels", "got 3 at flat index 2"),
        ({"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1])}, {}, "tensors.labels", r"expected shape \[4\]"),
        ({"logits": torch.randn(4, 3), "labels": torch.tensor([0.5, 1, 2, 0])}, {}, "tensors.labels", "non-integer"),
        ({"logits": torch.randn(4, 3)}, {}, "tensors.labels", "needs class indices"),
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            {"weight": [1.0, 2.0]},
            "functions[0].params.weight",
            "expected 3 class weights",
        ),
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            {"label_smoothing": 1.5},
            "functions[0].params.label_smoothing",
            r"\[0, 1\]",
        ),
        ({"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])}, {"nope": 1}, "functions[0].params.nope", "unknown parameter"),
        ({"logits": torch.randint(0, 3, (4, 3)), "labels": torch.tensor([0, 1, 2, 0])}, {}, "tensors.logits", "floating-point"),
    ],
)
def test_errors_name_the_field(tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": "cross_entropy", "params": params}])
    assert info.value.violations[0].field == field
