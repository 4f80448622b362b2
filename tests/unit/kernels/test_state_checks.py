"""check_state: every state the catalogue produces passes; forged ones are refused with the field named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from catalogue_inputs import INPUTS, valid_inputs
from lossd.kernels import InvalidInput, State, evaluate, get_function
from lossd.kernels.params import resolve_params
from lossd.kernels.state import MAX_STATE_CLASSES, check_state, merge_fields

PARAM_VARIANTS = {  # parameters that change a state's layout
    "auroc": [{"bins": 10}],
    "average_precision": [{"bins": 10}],
    "ece": [{"scope": "classwise", "n_bins": 7}],
    "moe_load_balancing": [{"top_k": 1}],
    "temperature": [{"grid_points": 9}],
}


def _check(state: State) -> None:
    fdef = get_function(state.function)
    check_state(state, fdef.fields, resolve_params(fdef.params, json.loads(state.params), "p"), "state")


def _with_nan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(arrays)
    for name, a in arrays.items():
        if a.dtype.kind == "f" and a.size and name not in ("weights", "mask", "targets", "target", "class_weights"):
            b = a.copy()
            b.reshape(-1)[0] = np.nan
            out[name] = b
            return out
    return out


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_catalogue_states_pass(name: str) -> None:
    rng = np.random.default_rng(1)
    for params in [{}, *PARAM_VARIANTS.get(name, [])]:
        for arrays in (valid_inputs(name, rng), _with_nan(valid_inputs(name, rng))):  # NaN propagates: still a valid state
            try:
                out = evaluate(arrays, [{"name": name, "params": params}], return_state=True)
            except InvalidInput:
                continue  # some functions refuse NaN inputs outright
            state = out[name].state
            assert state is not None
            _check(state)


def _ce_state(**fields: torch.Tensor) -> State:
    base = {"total": torch.tensor(3.0, dtype=torch.float64), "weight": torch.tensor(2.0, dtype=torch.float64)}
    base["count"] = torch.tensor(2.0, dtype=torch.float64)
    return State("cross_entropy", 1, "{}", {**base, **fields})


def _field_of(exc: pytest.ExceptionInfo[InvalidInput]) -> str:
    return exc.value.violations[0].field


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"weight": torch.tensor(-3.0, dtype=torch.float64)}, "state.fields.weight"),
        ({"count": torch.tensor(float("nan"), dtype=torch.float64)}, "state.fields.count"),
        ({"count": torch.tensor(float("inf"), dtype=torch.float64)}, "state.fields.count"),
        ({"total": torch.zeros(3, dtype=torch.float64)}, "state.fields.total"),
        ({"total": torch.tensor(1, dtype=torch.int64)}, "state.fields.total"),
        ({"matrix": torch.zeros(2, 2, dtype=torch.float64)}, "state.fields"),
    ],
)
def test_forged_mean_states_are_refused(fields: dict[str, torch.Tensor], field: str) -> None:
    fdef = get_function("cross_entropy")
    with pytest.raises(InvalidInput) as info:
        check_state(_ce_state(**fields), fdef.fields, resolve_params(fdef.params, {}, "p"), "state")
    assert _field_of(info) == field


def test_confusion_state_over_the_class_limit_is_refused() -> None:
    k = MAX_STATE_CLASSES + 1
    matrix = torch.zeros((), dtype=torch.float64).expand(k, k)  # no K×K allocation in the test
    state = State("f1", 1, "{}", {"matrix": matrix, "count": torch.tensor(1.0, dtype=torch.float64)})
    fdef = get_function("f1")
    with pytest.raises(InvalidInput, match="4096") as info:
        check_state(state, fdef.fields, resolve_params(fdef.params, {}, "p"), "state")
    assert _field_of(info) == "state.fields.matrix"


def test_moments_layout() -> None:
    fdef = get_function("r2")
    good = evaluate({"predictions": np.arange(6.0), "targets": np.arange(6.0) ** 2}, ["r2"], return_state=True)["r2"].state
    assert good is not None
    bad = State("r2", 1, good.params, {**good.fields, "sse": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(InvalidInput) as info:
        check_state(bad, fdef.fields, {}, "state")
    assert _field_of(info) == "state.fields.sse"
    m2 = good.fields["targets"].clone()
    m2[..., 2] = -1
    with pytest.raises(InvalidInput, match="M2"):
        check_state(State("r2", 1, good.params, {**good.fields, "targets": m2}), fdef.fields, {}, "state")


def test_merge_refuses_mixed_dtypes() -> None:
    a = _ce_state()
    b = _ce_state(total=torch.tensor(1, dtype=torch.int64))
    with pytest.raises(InvalidInput, match="dtypes") as info:
        merge_fields(a, b, get_function("cross_entropy").fields)
    assert _field_of(info) == "states.fields.total"
