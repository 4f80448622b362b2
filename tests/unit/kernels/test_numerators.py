"""Declared numerators: a function's value is numerator / denominator exactly when it says so.

Monitoring exports ``FunctionResult.numerator`` and ``denominator`` as
Prometheus counters and divides their sums, so a declared numerator must
reproduce the value and must add over batches like the state it comes from.
Functions whose value is no additive mean (ECE, AUROC, F1, perplexity...)
declare none; that list is pinned here so that a change is deliberate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from catalogue_inputs import valid_inputs
from helpers import assert_close
from lossd.kernels import Accumulator, FunctionDef, all_functions, evaluate

# Functions whose primary value is not an additive mean: a product of means (MoE
# balancing), a rank or ratio statistic, a nonlinear function of sums, a fit.
NOT_ADDITIVE = {
    "moe_load_balancing",
    "auroc",
    "average_precision",
    "confusion_matrix",
    "explained_variance",
    "f1",
    "perplexity",
    "precision",
    "r2",
    "recall",
    "rmse",
    "adaptive_ece",
    "debiased_ece",
    "ece",
    "mce",
    "reliability_diagram",
    "temperature",
}


def _variants(fdef: FunctionDef) -> list[dict[str, Any]]:
    """Default parameters, plus every other choice of a parameter that changes what the value divides by."""
    out: list[dict[str, Any]] = [{}]
    for param in fdef.params:
        if param.name in ("reduction", "normalization") and param.choices:
            out += [{param.name: c} for c in param.choices if c not in ("none", param.default)]
    return out


CASES = [
    pytest.param(f.name, params, id=f"{f.name}-{'-'.join(map(str, params.values())) or 'default'}")
    for f in all_functions()
    for params in _variants(f)
]


def _spec(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "params": params}


@pytest.mark.parametrize(("name", "params"), CASES)
def test_declared_numerator_reproduces_the_value(name: str, params: dict[str, Any]) -> None:
    r = evaluate(valid_inputs(name, np.random.default_rng(0)), [_spec(name, params)]).results[name]
    if name in NOT_ADDITIVE:
        assert r.numerator is None, f"{name} is not an additive mean but declares numerator {r.numerator}"
        return
    assert r.numerator is not None, f"{name} with {params} declares no numerator"
    assert r.denominator is not None and r.denominator > 0
    expected = r.numerator if params.get("reduction") == "sum" else r.numerator / r.denominator
    assert_close(r.value, expected, rtol=1e-12, atol=0, what=f"{name} value vs numerator/denominator")


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if c.values[0] not in NOT_ADDITIVE])
def test_numerator_and_denominator_add_over_batches(name: str, params: dict[str, Any]) -> None:
    """Two whole batches (so non-splittable functions qualify too): the merged sums are the parts' sums."""
    spec = _spec(name, params)
    batches = [valid_inputs(name, np.random.default_rng(seed)) for seed in (1, 2)]
    parts = [evaluate(b, [spec]).results[name] for b in batches]
    acc = Accumulator([spec])
    for b in batches:
        acc.add(b)
    merged = acc.result().results[name]
    assert merged.numerator is not None and merged.denominator is not None
    assert_close(merged.numerator, sum(p.numerator for p in parts), rtol=1e-12, atol=1e-15, what=f"{name} merged numerator")
    assert_close(merged.denominator, sum(p.denominator for p in parts), rtol=1e-12, atol=0, what=f"{name} merged denominator")


def test_per_element_results_declare_no_numerator() -> None:
    r = evaluate(valid_inputs("mse", np.random.default_rng(0)), [_spec("mse", {"reduction": "none"})]).results["mse"]
    assert r.numerator is None and r.denominator is None


def test_not_additive_names_are_registered() -> None:
    assert NOT_ADDITIVE <= {f.name for f in all_functions()}
