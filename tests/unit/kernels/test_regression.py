"""Regression losses against torch.nn.functional, sklearn's pinball loss and float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_pinball_loss

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import InvalidInput, evaluate, get_function


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    r = out[name]
    return (r.tensors["value"] if params.get("reduction") == "none" else r.value), out


REDUCTIONS = ("mean", "sum", "none")


def run_reductions(name, tensors, **params):
    """{reduction: value} for all three reductions, from one evaluation (three aliased specs)."""
    specs = [{"name": name, "alias": r, "params": {**params, "reduction": r}} for r in REDUCTIONS]
    out = evaluate(tensors, specs)
    return {r: (out[r].tensors["value"] if r == "none" else out[r].value) for r in REDUCTIONS}


def pair(shape, dtype=torch.float64, scale=2.0):
    pred = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    target = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    return pred, target


TORCH_LOSSES = [
    ("mse", {}, lambda p, t, r: F.mse_loss(p, t, reduction=r)),
    ("mae", {}, lambda p, t, r: F.l1_loss(p, t, reduction=r)),
    ("l1", {}, lambda p, t, r: F.l1_loss(p, t, reduction=r)),
    ("huber", {}, lambda p, t, r: F.huber_loss(p, t, reduction=r)),
    ("huber", {"delta": 0.3}, lambda p, t, r: F.huber_loss(p, t, reduction=r, delta=0.3)),
    ("huber", {"delta": 2.5}, lambda p, t, r: F.huber_loss(p, t, reduction=r, delta=2.5)),
    ("smooth_l1", {}, lambda p, t, r: F.smooth_l1_loss(p, t, reduction=r)),
    ("smooth_l1", {"beta": 0.4}, lambda p, t, r: F.smooth_l1_loss(p, t, reduction=r, beta=0.4)),
    ("smooth_l1", {"beta": 0.0}, lambda p, t, r: F.smooth_l1_loss(p, t, reduction=r, beta=0.0)),
]


@pytest.mark.parametrize("name, params, oracle", TORCH_LOSSES, ids=[f"{n}-{p}" for n, p, _ in TORCH_LOSSES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (257,), (5, 3), (4, 3, 2)])
def test_matches_torch(name, params, oracle, dtype, shape):
    pred, target = pair(shape, dtype)
    got = run_reductions(name, {"predictions": pred, "targets": target}, **params)
    for reduction in REDUCTIONS:
        ref = oracle(pred.double(), target.double(), reduction)
        assert_close(got[reduction], ref.numpy(), **tol(dtype), what=reduction)


def test_l1_is_an_alias_of_mae():
    assert get_function("l1") is get_function("mae")


@pytest.mark.parametrize("name, params, oracle", TORCH_LOSSES[:4], ids=[n for n, _, _ in TORCH_LOSSES[:4]])
def test_row_weights_give_a_weighted_mean(name, params, oracle):
    pred, target = pair((33, 4))
    w = torch.rand(33, dtype=torch.float64)
    w[::5] = 0
    got, out = run(name, {"predictions": pred, "targets": target, "weights": w}, **params)
    per = oracle(pred, target, "none")
    expected = (w[:, None] * per).sum() / (4 * w.sum())
    assert_close(got, expected.item(), rtol=1e-12)
    assert out[name].denominator == pytest.approx(4 * w.sum().item())
    assert out[name].denominator_kind == "weights"
    summed, _ = run(name, {"predictions": pred, "targets": target, "weights": w}, reduction="sum", **params)
    assert_close(summed, (w[:, None] * per).sum().item(), rtol=1e-12)


def test_integer_targets_are_accepted():
    pred = torch.randn(10, dtype=torch.float32)
    target = torch.randint(0, 5, (10,))
    got, _ = run("mse", {"predictions": pred, "targets": target})
    assert_close(got, F.mse_loss(pred.double(), target.double()).item(), **tol(torch.float32))


def log_cosh_ref(r):
    # log cosh r = logaddexp(r, −r) − log 2: the float64 identity that stays finite where cosh overflows.
    return np.logaddexp(r, -r) - math.log(2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_cosh_matches_float64(dtype):
    pred, target = pair((257, 2), dtype, scale=3.0)
    got = run_reductions("log_cosh", {"predictions": pred, "targets": target})
    per = np.log(np.cosh((target.double() - pred.double()).numpy()))
    for reduction, ref in {"mean": per.mean(), "sum": per.sum(), "none": per}.items():
        assert_close(got[reduction], ref, **tol(dtype), what=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_cosh_is_finite_at_extreme_residuals(dtype):
    pred = torch.tensor([1e4, -1e4, 0.0, 300.0], dtype=dtype)
    target = torch.tensor([0.0, 0.0, 1e-8, -500.0], dtype=dtype)
    got, out = run("log_cosh", {"predictions": pred, "targets": target}, reduction="none")
    assert np.isfinite(got).all()
    assert_close(got, log_cosh_ref((target.double() - pred.double()).numpy()), rtol=1e-7, atol=1e-12)
    assert out.diagnostics == []


QUANTILE_CASES = [[0.5], [0.1, 0.5, 0.9], [0.0, 0.25, 1.0]]


@pytest.mark.parametrize("quantiles", QUANTILE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_quantile_matches_sklearn_per_quantile(quantiles, dtype, weighted):
    n, q = 257, len(quantiles)
    target = torch.randn(n, dtype=torch.float64).to(dtype)
    pred = torch.randn(n, q, dtype=torch.float64).to(dtype)
    w = torch.rand(n, dtype=torch.float64) if weighted else None
    tensors = {"predictions": pred, "targets": target} | ({"weights": w} if weighted else {})
    got, _ = run("quantile", tensors, quantiles=quantiles)
    y, yhat = target.double().numpy(), pred.double().numpy()
    sw = None if w is None else w.numpy()
    ref = np.mean([mean_pinball_loss(y, yhat[:, i], alpha=a, sample_weight=sw) for i, a in enumerate(quantiles)])
    assert_close(got, ref, **tol(dtype))


def test_quantile_single_level_takes_predictions_of_the_targets_shape():
    target, pred = torch.randn(1, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    got, _ = run("quantile", {"predictions": pred, "targets": target}, quantiles=[0.3])
    assert_close(got, mean_pinball_loss(target.numpy(), pred.numpy(), alpha=0.3), rtol=1e-12)
    default, _ = run("quantile", {"predictions": pred[:, None], "targets": target})
    assert_close(default, mean_pinball_loss(target.numpy(), pred.numpy(), alpha=0.5), rtol=1e-12)


def test_quantile_multi_output():
    target = torch.randn(20, 3, dtype=torch.float64)
    pred = torch.randn(20, 3, 2, dtype=torch.float64)
    got = run_reductions("quantile", {"predictions": pred, "targets": target}, quantiles=[0.2, 0.7])
    r = target[..., None] - pred
    q = torch.tensor([0.2, 0.7], dtype=torch.float64)
    per = torch.maximum(q * r, (q - 1) * r).mean(-1)
    for reduction, ref in {"mean": per.mean(), "sum": per.sum(), "none": per}.items():
        assert_close(got[reduction], ref.numpy(), rtol=1e-12, what=reduction)
    ref = np.mean([mean_pinball_loss(target.numpy(), pred[..., i].numpy(), alpha=a) for i, a in enumerate([0.2, 0.7])])
    assert_close(got["mean"], ref, rtol=1e-12)


def var_for(kind, pred):
    shape = {"same": pred.shape, "drop_last": pred.shape[:-1], "one": pred.shape[:-1] + (1,)}[kind]
    return torch.rand(shape, dtype=torch.float64) + 0.05


@pytest.mark.parametrize("var_kind", ["same", "drop_last", "one"])
@pytest.mark.parametrize("full", [False, True])
def test_gaussian_nll_matches_torch(var_kind, full):
    pred, target = pair((31, 4))
    var = var_for(var_kind, pred)
    got = run_reductions("gaussian_nll", {"predictions": pred, "targets": target, "variance": var}, full=full)
    for reduction in REDUCTIONS:
        ref = F.gaussian_nll_loss(pred, target, var, full=full, reduction=reduction)
        assert_close(got[reduction], ref.numpy(), rtol=1e-12, atol=1e-12, what=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_nll_low_precision_and_eps_floor(dtype):
    pred, target = pair((257,), dtype)
    var = torch.rand(257, dtype=torch.float64).to(dtype)
    var[:10] = 0  # floored to eps, as torch does
    got, _ = run("gaussian_nll", {"predictions": pred, "targets": target, "variance": var}, eps=1e-3)
    ref = F.gaussian_nll_loss(pred.double(), target.double(), var.double(), eps=1e-3)
    assert_close(got, ref.item(), **tol(dtype))


def test_gaussian_nll_homoscedastic_channel_variance():
    pred, target = pair((2, 3, 4, 5))
    var = torch.rand(2, 1, 4, 5, dtype=torch.float64) + 0.1
    got, _ = run("gaussian_nll", {"predictions": pred, "targets": target, "variance": var})
    assert_close(got, F.gaussian_nll_loss(pred, target, var).item(), rtol=1e-12)


@pytest.mark.parametrize("log_input", [True, False])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_poisson_nll_matches_torch(log_input, full, dtype):
    target = torch.randint(0, 7, (257,)).to(dtype)
    pred = (torch.randn(257, dtype=torch.float64) if log_input else torch.rand(257, dtype=torch.float64) * 4).to(dtype)
    if not log_input:
        pred[0] = 0.0  # eps keeps log finite
    got = run_reductions("poisson_nll", {"predictions": pred, "targets": target}, log_input=log_input, full=full)
    for reduction in REDUCTIONS:
        ref = F.poisson_nll_loss(pred.double(), target.double(), log_input=log_input, full=full, reduction=reduction)
        assert_close(got[reduction], ref.numpy(), **tol(dtype), what=reduction)


def test_poisson_nll_overflow_is_inf_and_reported():
    pred = torch.tensor([800.0, 1.0], dtype=torch.float64)
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got, out = run("poisson_nll", {"predictions": pred, "targets": target})
    assert got == math.inf
    assert "overflow" in [d.code for d in out.diagnostics]
    # float32 inputs whose exp only overflows float32 stay finite (computed in float64).
    finite, clean = run("poisson_nll", {"predictions": torch.tensor([100.0]), "targets": torch.tensor([3.0])})
    assert_close(finite, math.exp(100.0) - 300.0, rtol=1e-12)
    assert clean.diagnostics == []


@pytest.mark.parametrize(
    "name, params, extra",
    [
        ("mse", {}, {}),
        ("mae", {}, {}),
        ("huber", {"delta": 0.5}, {}),
        ("smooth_l1", {"beta": 0.5}, {}),
        ("log_cosh", {}, {}),
        ("quantile", {"quantiles": [0.1, 0.9]}, {"quantile": True}),
        ("gaussian_nll", {"full": True}, {"variance": True}),
        ("poisson_nll", {"full": True}, {}),
    ],
)
def test_merge_is_exact(name, params, extra):
    pred, target = pair((101, 3), torch.float32)
    if name == "poisson_nll":
        target = torch.randint(0, 5, (101, 3)).float()
    tensors = {"predictions": pred, "targets": target, "weights": torch.rand(101)}
    if extra.get("quantile"):
        tensors["predictions"] = torch.randn(101, 3, 2)
    if extra.get("variance"):
        tensors["variance"] = torch.rand(101, 3) + 0.1
    assert_merge_exact(tensors, {"name": name, "params": params}, parts=5)


def test_all_zero_weights_are_all_ignored():
    pred, target = pair((6,))
    got, out = run("mse", {"predictions": pred, "targets": target, "weights": torch.zeros(6, dtype=torch.float64)})
    assert math.isnan(got)
    assert "all_ignored" in [d.code for d in out.diagnostics]


P, T = torch.randn(4, 3), torch.randn(4, 3)


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        ("mse", {"predictions": P, "targets": T[:, :2]}, {}, "tensors.targets", r"expected the shape of predictions \[4, 3\]"),
        ("mse", {"predictions": P.int(), "targets": T}, {}, "tensors.predictions", "floating-point"),
        ("mse", {"predictions": P}, {}, "tensors.targets", "needs role 'targets'"),
        ("mse", {"predictions": P, "targets": T, "weights": -torch.ones(4)}, {}, "tensors.weights", "non-negative"),
        ("mse", {"predictions": P, "targets": T, "weights": torch.ones(3)}, {}, "tensors.weights", "prefix"),
        ("mse", {"predictions": torch.tensor(1.0), "targets": torch.tensor(1.0)}, {}, "tensors.predictions", "expected shape"),
        ("huber", {"predictions": P, "targets": T}, {"delta": 0.0}, "functions[0].params.delta", r"> 0"),
        ("smooth_l1", {"predictions": P, "targets": T}, {"beta": -1.0}, "functions[0].params.beta", ">= 0"),
        ("quantile", {"predictions": P, "targets": T}, {"quantiles": [0.1, 0.9]}, "tensors.predictions", r"expected shape \[4, 3, 2\]"),
        ("quantile", {"predictions": P, "targets": T}, {"quantiles": [1.5]}, "functions[0].params.quantiles[0]", r"\[0, 1\]"),
        ("quantile", {"predictions": P, "targets": T}, {"quantiles": []}, "functions[0].params.quantiles", "non-empty"),
        ("gaussian_nll", {"predictions": P, "targets": T, "variance": -torch.ones(4, 3)}, {}, "tensors.variance", "non-negative"),
        (
            "gaussian_nll",
            {"predictions": P, "targets": T, "variance": torch.ones(2, 3)},
            {},
            "tensors.variance",
            r"expected shape \[4, 3\]",
        ),
        ("gaussian_nll", {"predictions": P, "targets": T}, {}, "tensors.variance", "needs role 'variance'"),
        (
            "gaussian_nll",
            {"predictions": P, "targets": T, "variance": torch.ones(4, 3)},
            {"eps": 0.0},
            "functions[0].params.eps",
            r"in \(0, 1e\+30\]",
        ),
        ("poisson_nll", {"predictions": P, "targets": -T.abs() - 1}, {}, "tensors.targets", "non-negative counts"),
        (
            "poisson_nll",
            {"predictions": -P.abs() - 1, "targets": T.abs()},
            {"log_input": False},
            "tensors.predictions",
            "non-negative rates",
        ),
        ("poisson_nll", {"predictions": P, "targets": T.abs()}, {"log_input": 1}, "functions[0].params.log_input", "boolean"),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field
