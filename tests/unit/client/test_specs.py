"""Function specs: names, name:k=v lists, JSON objects; the proto round trip."""

from __future__ import annotations

import pytest

from lossd.client.specs import SpecError, parse_spec, spec_from_proto, spec_to_proto


def spec(name: str, params: dict | None = None, inputs: dict | None = None, alias: str = "") -> dict:
    return {"name": name, "params": params or {}, "inputs": inputs or {}, "alias": alias}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cross_entropy", spec("cross_entropy")),
        ("  ece  ", spec("ece")),
        ("ece:n_bins=15", spec("ece", {"n_bins": 15})),
        ("cross_entropy:label_smoothing=0.1,ignore_index=-1", spec("cross_entropy", {"label_smoothing": 0.1, "ignore_index": -1})),
        ("quantile:quantiles=[0.1,0.9]", spec("quantile", {"quantiles": [0.1, 0.9]})),
        ("quantile:quantiles=[0.1, 0.5, 0.9],reduction=sum", spec("quantile", {"quantiles": [0.1, 0.5, 0.9], "reduction": "sum"})),
        ("ece:norm=l2", spec("ece", {"norm": "l2"})),  # bare words are strings
        ('ece:norm="l2"', spec("ece", {"norm": "l2"})),
        ('x:s="a,b",t=1', spec("x", {"s": "a,b", "t": 1})),  # commas inside quotes do not split
        ("x:flag=true,none=null", spec("x", {"flag": True, "none": None})),
        ('x:m={"a":1,"b":2}', spec("x", {"m": {"a": 1, "b": 2}})),
        (
            '{"name": "cross_entropy", "params": {"label_smoothing": 0.1}, "inputs": {"logits": "student"}, "alias": "ce_s"}',
            spec("cross_entropy", {"label_smoothing": 0.1}, {"logits": "student"}, "ce_s"),
        ),
        ('{"name": "mse"}', spec("mse")),
    ],
)
def test_parse_spec(text: str, expected: dict) -> None:
    assert parse_spec(text) == expected


def test_parse_mapping() -> None:
    assert parse_spec({"name": "ece", "params": {"n_bins": 10}}) == spec("ece", {"n_bins": 10})


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("", "empty string"),
        ("   ", "empty string"),
        ("ece:n_bins", "expected param=value"),
        ("ece:=3", "expected param=value"),
        (":n_bins=3", "function name"),
        ("{not json", "invalid JSON"),
        ('{"name": "ece", "bogus": 1}', "unknown spec key"),
        ('{"params": {}}', "function name"),
        ('{"name": 3}', "function name"),
        ('{"name": "ece", "params": [1]}', "'params' to be an object"),
        ('{"name": "ece", "inputs": "x"}', "'inputs' to be an object"),
        ('{"name": "ece", "alias": 3}', "'alias' to be a string"),
        ({"name": "ece", "extra": 1}, "unknown spec key"),
    ],
)
def test_parse_spec_errors(bad: object, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(bad)  # type: ignore[arg-type]


def test_spec_error_is_value_error() -> None:
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize(
    "text",
    ["cross_entropy", "quantile:quantiles=[0.1,0.9]", '{"name": "ce", "params": {"w": [1, 2.5]}, "inputs": {"logits": "z"}, "alias": "a"}'],
)
def test_proto_round_trip(text: str) -> None:
    parsed = parse_spec(text)
    back = spec_from_proto(spec_to_proto(text))
    assert back["name"] == parsed["name"] and back["inputs"] == parsed["inputs"] and back["alias"] == parsed["alias"]
    # Struct numbers are doubles: ints come back as equal floats
    assert back["params"] == parsed["params"]


@pytest.mark.parametrize("text", ["ece:n_bins=15,n_bins=10", "cross_entropy:label_smoothing=0.3, label_smoothing =0.0"])
def test_a_parameter_given_twice_is_refused_not_last_wins(text: str) -> None:
    with pytest.raises(SpecError, match="twice"):
        parse_spec(text)
