"""EvaluationResult: results by alias, values, tensors, states, diagnostics and the eval JSON object."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lossd.client import EvaluationResult
from lossd.client.codec import encode_tensor
from lossd.client.evaluation import Diagnostic, merge_diagnostics
from lossd.client.results import response_to_json
from lossd.v1 import lossd_pb2 as pb


def response() -> pb.EvaluateResponse:
    ce = pb.FunctionResult(alias="ce", function="cross_entropy", values={"value": 2.5}, denominator=64, denominator_kind="samples")
    ce.state.CopyFrom(pb.State(function="cross_entropy", version=1, batches=3))
    ece = pb.FunctionResult(
        alias="ece",
        function="ece",
        values={"value": 0.1, "mce": 0.3},
        tensors={"bin_counts": encode_tensor(np.array([1.0, 2.0, 0.0]), "bin_counts")},
    )
    none = pb.FunctionResult(
        alias="per", function="cross_entropy", tensors={"value": encode_tensor(np.array([0.5, 1.5]), "value")}, denominator_kind="elements"
    )
    diagnostics = [pb.Diagnostic(code="nan_or_inf", severity=pb.WARNING, message="1 NaN", function="ce", count=2)]
    return pb.EvaluateResponse(results=[ce, ece, none], diagnostics=diagnostics, request_id="r", batches=3)


def test_results_by_alias_in_order() -> None:
    out = EvaluationResult(response())
    assert list(out) == ["ce", "ece", "per"] and len(out) == 3 and "ce" in out
    assert out["ce"].value == 2.5 and out["ce"].denominator == 64 and out["ce"].denominator_kind == "samples"
    assert out["ece"].values == {"value": 0.1, "mce": 0.3} and out["ece"].denominator is None
    assert np.array_equal(out["ece"].tensors["bin_counts"], [1, 2, 0])
    assert out.batches == 3 and out.request_id == "r"
    assert out["ce"].state is not None and out["ce"].state.batches == 3 and out["ece"].state is None
    assert set(out.states()) == {"ce"}
    assert out.diagnostics == [Diagnostic("nan_or_inf", "warning", "1 NaN", "ce", 2)]
    assert "FunctionResult('ce', cross_entropy: value=2.5)" in repr(out)


def test_value_of_a_tensor_result_says_where_it_is() -> None:
    out = EvaluationResult(response())
    with pytest.raises(
        ValueError, match=r"per: expected a scalar 'value', but cross_entropy returned a tensor \(see .tensors\['value'\]\)"
    ):
        _ = out["per"].value
    assert np.array_equal(out["per"].tensors["value"], [0.5, 1.5])


def test_unknown_alias() -> None:
    with pytest.raises(KeyError, match=r"no result with alias 'nope'; the results are \['ce', 'ece', 'per'\]"):
        EvaluationResult(response())["nope"]


def test_to_json_is_the_eval_object() -> None:
    out = EvaluationResult(response())
    obj = out.to_json()
    assert obj == response_to_json(response())
    assert obj["results"]["ce"] == 2.5
    assert obj["results"]["ece"] == {"value": 0.1, "mce": 0.3, "bin_counts": [1.0, 2.0, 0.0]}
    assert obj["diagnostics"] == [{"code": "nan_or_inf", "severity": "warning", "message": "1 NaN", "function": "ce", "count": 2}]


def test_replaced_diagnostics() -> None:
    merged = [Diagnostic("nan_or_inf", "warning", "3 NaN", "ce", 5)]
    out = EvaluationResult(response(), merged)
    assert out.diagnostics == merged
    assert out.to_json()["diagnostics"][0]["count"] == 5


def test_merge_diagnostics_adds_counts() -> None:
    a = Diagnostic("nan_or_inf", "warning", "first", "ce", 1)
    b = Diagnostic("nan_or_inf", "warning", "second", "ce", 2)
    c = Diagnostic("nan_or_inf", "warning", "other fn", "acc", 1)
    assert merge_diagnostics([a, b, c]) == [Diagnostic("nan_or_inf", "warning", "second", "ce", 3), c]


def test_nan_values_serialize_as_null() -> None:
    r = pb.EvaluateResponse(results=[pb.FunctionResult(alias="x", function="x", values={"value": math.nan})])
    assert EvaluationResult(r).to_json() == {"results": {"x": None}, "diagnostics": []}
