"""State sums that overflow float64 from finite inputs are said (sum_overflow) and their values are NaN, never 0 or a silent NaN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lossd.kernels import Accumulator, evaluate, finalize_states


def _batch(weight: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return {"logits": z, "labels": z.argmax(1), "weights": torch.full((8,), weight, dtype=torch.float64)}  # every prediction right


def _codes(evaluation) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {d.function: d.code for d in evaluation.diagnostics}


def test_weights_whose_sum_overflows_give_nan_and_say_why() -> None:
    out = evaluate(_batch(1e308), ["cross_entropy", "accuracy"])
    assert math.isnan(out["cross_entropy"].value) and math.isnan(out["accuracy"].value)  # accuracy was 0.0 (finite / inf)
    assert _codes(out) == {"cross_entropy": "sum_overflow", "accuracy": "sum_overflow"}
    message = next(d.message for d in out.diagnostics if d.function == "accuracy")
    assert "'weights'" in message and "Scale the weights" in message  # the denominator: a sum of weights
    scaled = evaluate(_batch(1.0), ["cross_entropy", "accuracy"])  # the same weighted means, weights scaled by 1e-308
    b = _batch(1.0)
    assert scaled["cross_entropy"].value == pytest.approx(float(F.cross_entropy(b["logits"], b["labels"])), rel=1e-12)
    assert scaled["accuracy"].value == 1.0 and scaled.diagnostics == []


def test_a_run_whose_totals_overflow_when_merged_says_so() -> None:
    acc = Accumulator(["cross_entropy"])
    for _ in range(3):  # 8 × 2e307 = 1.6e308 of weight a batch: finite alone, inf once two are merged
        acc.add(_batch(2e307))
    assert _codes(acc.result()) == {"cross_entropy": "sum_overflow"}
    one = evaluate(_batch(2e307), ["cross_entropy"], return_state=True)
    assert one.diagnostics == [] and math.isfinite(one["cross_entropy"].value)  # 8 × 2e307 = 1.6e308: finite alone
    state = one["cross_entropy"].state
    assert state is not None
    merged = finalize_states([("cross_entropy", state), ("cross_entropy", state)])
    assert math.isnan(merged["cross_entropy"].value) and _codes(merged) == {"cross_entropy": "sum_overflow"}


def test_an_inf_input_is_nan_or_inf_not_an_overflow() -> None:
    b = _batch(1.0)
    b["logits"][0, 0] = math.inf
    out = evaluate(b, ["cross_entropy"])
    assert [d.code for d in out.diagnostics] == ["nan_or_inf"]


def test_a_nan_of_the_function_itself_is_not_an_overflow() -> None:
    b = _batch(1.0)
    b["labels"][:] = -100
    out = evaluate(b, ["cross_entropy"])
    assert math.isnan(out["cross_entropy"].value) and [d.code for d in out.diagnostics] == ["all_ignored"]
