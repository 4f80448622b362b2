"""Param.check and resolve_params on hostile values: every refusal names the parameter; nothing else escapes."""

from __future__ import annotations

import math

import pytest

from lossd.kernels import InvalidInput
from lossd.kernels.params import QUOTE_LIMIT, Param, resolve_params

FLOAT = Param("margin", "float", 1.0, minimum=0.0)
INT = Param("bins", "int", 10, minimum=2)
LIST = Param("weight", "float_list", None, nullable=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 10**400])
def test_float_params_are_finite(bad: float) -> None:
    with pytest.raises(InvalidInput, match="finite") as info:
        resolve_params([FLOAT], {"margin": bad}, "functions[0].params")
    assert info.value.violations[0].field == "functions[0].params.margin"


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 1e30, pytest.param(10**5000, id="10^5000")])
def test_int_params_fit_int64(bad: float) -> None:
    with pytest.raises(InvalidInput, match=r"2\^63") as info:
        resolve_params([INT], {"bins": bad}, "p")
    assert info.value.violations[0].field == "p.bins"
    assert len(str(info.value)) < 200  # a 5000-digit integer is described, not printed


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.5])
def test_int_params_refuse_non_integers(bad: float) -> None:
    with pytest.raises(InvalidInput, match="integer"):
        INT.check(bad, "p.bins")


def test_non_finite_inside_a_list_names_the_element() -> None:
    with pytest.raises(InvalidInput) as info:
        resolve_params([LIST], {"weight": [1.0, math.nan]}, "p")
    assert info.value.violations[0].field == "p.weight[1]"


def test_client_text_is_quoted_short() -> None:
    name, value = "n" * 10_000, "v" * 10_000
    with pytest.raises(InvalidInput) as info:
        resolve_params([FLOAT, Param("norm", "str", "l1", choices=("l1", "l2"))], {name: 1, "norm": value}, "p")
    assert all(len(v.field) < QUOTE_LIMIT + 10 and len(v.description) < 200 for v in info.value.violations)
    with pytest.raises(InvalidInput) as info:
        resolve_params([Param("norm", "str", "l1", choices=("l1", "l2"))], {"norm": value}, "p")
    assert len(info.value.violations[0].description) < 200


def test_extremes_within_range_pass() -> None:
    assert INT.check(2**63 - 1, "p") == 2**63 - 1
    assert FLOAT.check(1e308, "p") == 1e308
    assert INT.check(4.0, "p") == 4 and isinstance(INT.check(4.0, "p"), int)
