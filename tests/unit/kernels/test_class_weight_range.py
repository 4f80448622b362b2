"""Class weights the scores' compute dtype cannot hold are refused, naming the weight: never turned into inf or 0 unsaid.

float32 scores are computed in float32 (bf16 and fp16 too), and so are their
class weights: 1e39 became inf (the mean NaN, blamed on an overflowing sum),
and 1e-50 became 0 (its class silently dropped from a weighted mean).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalogue_inputs import valid_inputs
from lossd.kernels import all_functions, evaluate
from lossd.kernels.errors import InvalidInput

WEIGHTED = sorted(f.name for f in all_functions() if any(p.name == "weight" and p.kind == "float_list" for p in f.params))


def test_every_class_weighted_function_is_covered() -> None:
    assert "cross_entropy" in WEIGHTED and len(WEIGHTED) >= 3


def _batch(name: str) -> tuple[dict[str, torch.Tensor], int]:
    arrays = valid_inputs(name, np.random.default_rng(0))
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    scores = next(t for t in tensors.values() if t.is_floating_point() and t.ndim >= 2)
    return tensors, scores.shape[1]


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize(("extreme", "becomes"), [(1e39, "inf"), (1e-50, "0")])
def test_a_weight_float32_cannot_hold_is_refused(name: str, extreme: float, becomes: str) -> None:
    tensors, k = _batch(name)
    weight = [1.0] * k
    weight[1] = extreme
    with pytest.raises(InvalidInput) as error:
        evaluate(tensors, [{"name": name, "params": {"weight": weight}}])
    (violation,) = error.value.violations
    assert violation.field == "functions[0].params.weight[1]"
    assert f"rounds to {becomes}" in violation.description and "float32" in violation.description


@pytest.mark.parametrize("name", WEIGHTED)
def test_zero_tiny_and_float64_weights_are_kept(name: str) -> None:
    tensors, k = _batch(name)
    evaluate(tensors, [{"name": name, "params": {"weight": [0.0] + [1e-40] + [1.0] * (k - 2)}}])  # 0 as given; a subnormal is not 0
    as_float64 = {n: t.double() if t.is_floating_point() else t for n, t in tensors.items()}
    evaluate(as_float64, [{"name": name, "params": {"weight": [1e39] + [1.0] * (k - 1)}}])  # float64 holds it
