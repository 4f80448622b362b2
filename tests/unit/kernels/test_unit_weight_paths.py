"""The shortcuts small requests take keep every number: unit weights, the finite-logits check, estimates made once.

A mean loss whose elements all weigh 1 skips the weight tensor, its product
and its mask (``Terms.weight`` None); cross-entropy takes that path when no
label is ignored and no class weight is given; the CPU row pass proves its
row maxima finite from log_softmax's values. Each must give bit for bit what
the explicit computation gives, on NaN, ±inf and strided inputs too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossd.kernels import evaluate
from lossd.kernels.budget import Budget, Estimated, estimates
from lossd.kernels.errors import RequestBudgetExceeded
from lossd.kernels.evaluate import prepare
from lossd.kernels.reduce import Terms, weighted_sums
from lossd.kernels.row_stats import row_statistics


def _explicit_fields(loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean-loss fields the general path computes, with a weight tensor of ones."""
    ones = torch.ones_like(loss)
    return weighted_sums(Terms(loss, ones).contributions(ones, None), ones)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), -float("inf"), -0.0])
def test_unit_weights_give_the_fields_of_a_weight_of_ones(dtype: torch.dtype, special: float | None) -> None:
    loss = torch.randn(257, generator=torch.Generator().manual_seed(3)).abs().to(dtype)
    if special is not None:
        loss[5] = special
    fast = weighted_sums(Terms(loss).contributions(None, None), None)
    slow = _explicit_fields(loss)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].dtype == slow[name].dtype == torch.float64 and fast[name].shape == slow[name].shape == ()
        assert fast[name].numpy().tobytes() == slow[name].numpy().tobytes(), name
    assert fast["weight"] is not fast["count"]  # two fields, two tensors: merging one never touches the other


def test_an_empty_batch_of_unit_weights_sums_to_zero() -> None:
    fast = weighted_sums(torch.empty(0), None)
    assert [float(fast[k]) for k in ("total", "weight", "count")] == [0.0, 0.0, 0.0]


def _ce_state(logits: np.ndarray, labels: np.ndarray, **params: object) -> dict[str, bytes]:
    ev = evaluate({"logits": logits, "labels": labels}, [{"name": "cross_entropy", "params": params}], return_state=True)
    state = ev["cross_entropy"].state
    assert state is not None
    return {k: v.numpy().tobytes() for k, v in state.fields.items()}


def test_cross_entropy_without_ignored_labels_matches_the_weighted_path() -> None:
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((300, 9)).astype(np.float32)
    labels = rng.integers(0, 9, 300)
    # Class weights of ones take the weighted path (w[y] * valid): the same fields, bit for bit.
    assert _ce_state(logits, labels) == _ce_state(logits, labels, weight=[1.0] * 9)
    ignored = labels.copy()
    ignored[:3] = -100  # ignored labels keep the mask: three elements fewer
    fields = _ce_state(logits, ignored)
    assert np.frombuffer(fields["count"], dtype=np.float64)[0] == 297.0


def test_per_element_values_of_unit_weights_are_the_losses() -> None:
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.standard_normal((8, 3)))  # float64: the values need no conversion
    labels = torch.from_numpy(rng.integers(0, 3, 8))
    spec = {"name": "cross_entropy", "params": {"reduction": "none"}}
    values = evaluate({"logits": logits, "labels": labels}, [spec])["cross_entropy"].tensors["value"]
    np.testing.assert_allclose(values, torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy(), rtol=1e-12)
    weighted = evaluate({"logits": logits, "labels": labels}, [{**spec, "params": {"reduction": "none", "weight": [1.0] * 3}}])
    assert values.tobytes() == weighted["cross_entropy"].tensors["value"].tobytes()


def test_strided_losses_keep_the_weighted_summation() -> None:
    # mse over a transposed view: its terms are strided, so the sums take the general path.
    rng = np.random.default_rng(2)
    pred = torch.from_numpy(rng.standard_normal((64, 33)).astype(np.float32)).t()
    target = torch.from_numpy(rng.standard_normal((64, 33)).astype(np.float32)).t()
    ev = evaluate({"predictions": pred, "targets": target}, ["mse"], return_state=True)
    state = ev["mse"].state
    assert state is not None
    expected = ((pred - target) ** 2).to(torch.float64)
    assert float(state.fields["count"]) == pred.numel() == float(state.fields["weight"])
    assert float(state.fields["total"]) == pytest.approx(float(expected.sum()), rel=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rows_with_non_finite_scores_still_take_the_exp_path(bad: float) -> None:
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    z[2, 1] = bad
    if bad == -float("inf"):
        z[4] = bad  # a row of all −inf: its max is not finite either
    stats = row_statistics(z, 1, False)
    expected = torch.logsumexp(z, dim=1)
    np.testing.assert_array_equal(torch.isnan(stats.lse).numpy(), torch.isnan(expected).numpy())
    finite = torch.isfinite(expected)
    torch.testing.assert_close(stats.lse[finite], expected[finite])
    assert not stats.finite


def test_finite_scores_are_proven_finite() -> None:
    stats = row_statistics(torch.randn(16, 7, generator=torch.Generator().manual_seed(4)), 1, False)
    assert stats.finite


def test_estimated_budgets_refuse_as_budgets_do() -> None:
    rng = np.random.default_rng(0)
    tensors = {"logits": rng.standard_normal((1, 64)).astype(np.float32), "labels": np.array([3])}
    specs = prepare([{"name": "confusion_matrix", "alias": f"cm{i}"} for i in range(32)])
    budget = Budget(1 << 20, None)  # 32 confusion states of 64 × 64 float64 cells, a few times over
    with pytest.raises(RequestBudgetExceeded) as direct:
        evaluate(tensors, specs, budget=budget)
    with pytest.raises(RequestBudgetExceeded) as known:
        evaluate(tensors, specs, budget=Estimated(budget, estimates(specs, tensors)))
    assert str(known.value) == str(direct.value) and known.value.setting == direct.value.setting
    # The estimates given are the ones checked: estimates under the budget let the request through.
    small = [(alias, e._replace(memory=1)) for alias, e in estimates(specs, tensors)]
    assert len(evaluate(tensors, specs, budget=Estimated(budget, small)).results) == 32
