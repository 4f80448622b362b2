"""rmse, r2 and explained_variance against sklearn, including merges of moment states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import explained_variance_score, r2_score, root_mean_squared_error

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import Accumulator, InvalidInput, evaluate, get_function

METRICS = {
    "rmse": root_mean_squared_error,
    "r2": r2_score,
    "explained_variance": explained_variance_score,
}


def metric(name, tensors):
    out = evaluate(tensors, [name])
    return out[name], out


def noisy(shape, dtype=torch.float64, noise=0.7):
    target = torch.randn(shape, dtype=torch.float64) * 3 + 1
    pred = target + noise * torch.randn(shape, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


def sk(name, pred, target, w=None, multioutput="uniform_average"):
    sw = None if w is None else w.double().numpy()
    return METRICS[name](target.double().numpy(), pred.double().numpy(), sample_weight=sw, multioutput=multioutput)


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2,), (257,), (40, 1), (40, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_sklearn(name, dtype, shape, weighted):
    pred, target = noisy(shape, dtype)
    w = torch.rand(shape[0], dtype=torch.float64) if weighted else None
    tensors = {"predictions": pred, "targets": target} | ({"weights": w} if weighted else {})
    r, _ = metric(name, tensors)
    assert_close(r.value, sk(name, pred, target, w), **tol(dtype))
    raw = np.atleast_1d(sk(name, pred, target, w, multioutput="raw_values"))
    assert_close(r.tensors["per_output"], raw, **tol(dtype))
    assert r.denominator == pytest.approx(shape[0] if w is None else w.sum().item())
    assert r.denominator_kind == ("weights" if weighted else "samples")


def test_mae_metric_is_the_regression_loss():
    assert get_function("mae").family == "regression"
    with pytest.raises(InvalidInput, match="unknown function"):
        get_function("mean_absolute_error")


@pytest.mark.parametrize("name", ["r2", "explained_variance"])
@pytest.mark.parametrize("value", [3.0, 0.1, -1e6 / 3])
def test_constant_targets_follow_sklearn_conventions(name, value):
    target = torch.full((257,), value, dtype=torch.float64)
    perfect, _ = metric(name, {"predictions": target.clone(), "targets": target})
    assert perfect.value == 1.0
    off = target + torch.linspace(-1, 1, 257, dtype=torch.float64)
    imperfect, _ = metric(name, {"predictions": off, "targets": target})
    assert imperfect.value == 0.0
    # sklearn agrees wherever its own mean of the constant is exact
    if value == 3.0:
        assert imperfect.value == sk(name, off, target)


def test_explained_variance_ignores_a_constant_offset():
    pred, target = noisy((50,))
    shifted, _ = metric("explained_variance", {"predictions": pred + 5, "targets": target})
    assert_close(shifted.value, sk("explained_variance", pred + 5, target), rtol=1e-10)
    offset = target + 2.5  # residuals constant: sklearn's 1.0
    r, _ = metric("explained_variance", {"predictions": offset, "targets": target})
    assert r.value == 1.0 == sk("explained_variance", offset, target)


def test_constant_and_varying_outputs_mix():
    pred, target = noisy((30, 2))
    target[:, 0] = 2.0
    pred[:, 0] = 2.0
    for name in ("r2", "explained_variance"):
        r, _ = metric(name, {"predictions": pred, "targets": target})
        assert r.tensors["per_output"][0] == 1.0
        assert_close(r.value, sk(name, pred, target), rtol=1e-10)


def test_single_sample():
    pred, target = torch.tensor([1.5], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    r2, _ = metric("r2", {"predictions": pred, "targets": target})
    assert math.isnan(r2.value)  # sklearn: R² needs two samples
    ev, _ = metric("explained_variance", {"predictions": pred, "targets": target})
    assert ev.value == explained_variance_score(target.numpy(), pred.numpy())
    rmse, _ = metric("rmse", {"predictions": pred, "targets": target})
    assert_close(rmse.value, 0.5, rtol=1e-15)


@pytest.mark.parametrize("name", METRICS)
def test_zero_weights_drop_rows(name):
    pred, target = noisy((40, 2))
    w = torch.rand(40, dtype=torch.float64)
    w[::3] = 0
    pred[::3] = 1e6  # never seen
    r, _ = metric(name, {"predictions": pred, "targets": target, "weights": w})
    assert_close(r.value, sk(name, pred, target, w), rtol=1e-10)
    pred[::3] = math.inf  # not even as inf
    r_inf, _ = metric(name, {"predictions": pred, "targets": target, "weights": w})
    assert_close(r_inf.value, r.value, rtol=1e-12)


@pytest.mark.parametrize("name", METRICS)
def test_all_zero_weights_are_nan_and_diagnosed(name):
    pred, target = noisy((5,))
    r, out = metric(name, {"predictions": pred, "targets": target, "weights": torch.zeros(5, dtype=torch.float64)})
    assert math.isnan(r.value)
    assert r.denominator == 0
    assert "all_ignored" in [d.code for d in out.diagnostics]


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("shape", [(101,), (101, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_is_exact(name, shape, weighted):
    pred, target = noisy(shape, torch.float32)
    tensors = {"predictions": pred, "targets": target} | ({"weights": torch.rand(shape[0])} if weighted else {})
    assert_merge_exact(tensors, name, parts=6)


@pytest.mark.parametrize("name", ["r2", "explained_variance"])
def test_merge_keeps_constant_targets_exact(name):
    target = torch.full((64,), 0.1, dtype=torch.float64)
    perfect = Accumulator([name])
    imperfect = Accumulator([name])
    for s in (slice(0, 7), slice(7, 40), slice(40, 64)):
        perfect.add({"predictions": target[s], "targets": target[s]})
        imperfect.add({"predictions": target[s] + 0.5 * torch.arange(s.stop - s.start), "targets": target[s]})
    assert perfect.result()[name].value == 1.0
    assert imperfect.result()[name].value == 0.0


def test_merge_is_stable_for_batches_with_distant_means():
    # Summing y and y² would lose every digit here; Chan's merge of (n, mean, M2) does not.
    rng = np.random.default_rng(1)
    parts = [(1e8 + rng.normal(size=50), 1e8 + rng.normal(size=50)) for _ in range(4)]
    acc = Accumulator(list(METRICS))
    for t, p in parts:
        acc.add({"predictions": torch.from_numpy(p), "targets": torch.from_numpy(t)})
    t_all = np.concatenate([t for t, _ in parts])
    p_all = np.concatenate([p for _, p in parts])
    result = acc.result()
    for name, fn in METRICS.items():
        assert_close(result[name].value, fn(t_all, p_all), rtol=1e-7, what=name)


P, T = torch.randn(6, 2), torch.randn(6, 2)


@pytest.mark.parametrize(
    "name, tensors, field, match",
    [
        ("r2", {"predictions": P, "targets": T[:, :1]}, "tensors.targets", r"expected the shape of predictions \[6, 2\]"),
        ("r2", {"predictions": torch.randn(6, 2, 2), "targets": torch.randn(6, 2, 2)}, "tensors.predictions", r"\[N\] or \[N, D\]"),
        ("rmse", {"predictions": P.long(), "targets": T}, "tensors.predictions", "floating-point"),
        ("explained_variance", {"predictions": P, "targets": T, "weights": -torch.ones(6)}, "tensors.weights", "non-negative"),
        ("rmse", {"predictions": torch.randn(6, 0), "targets": torch.randn(6, 0)}, "tensors.predictions", "at least one output"),
    ],
)
def test_errors_name_the_field(name, tensors, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [name])
    assert info.value.violations[0].field == field


def test_outputs_of_different_width_do_not_merge():
    acc = Accumulator(["r2"])
    acc.add({"predictions": torch.randn(5, 2), "targets": torch.randn(5, 2)})
    with pytest.raises(InvalidInput, match="matching shapes"):
        acc.add({"predictions": torch.randn(5, 3), "targets": torch.randn(5, 3)})
