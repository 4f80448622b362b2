"""Forged states (prior_states, Finalize) that used to pass check_state: each is refused on the field it forges.

And the other side of each rule: real states of every catalogue function,
non-finite inputs and weights included (nan_policy='propagate'), single and
merged, still validate (test_state_checks.py covers clean and NaN inputs).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch

from catalogue_inputs import INPUTS, valid_inputs
from lossd.client.local import state_to_proto
from lossd.kernels import InvalidInput, State, evaluate, get_function
from lossd.kernels.calibration.bins import ADAPTIVE_HISTOGRAM_BINS
from lossd.kernels.params import resolve_params
from lossd.kernels.state import ADAPTIVE_HISTOGRAM_BINS as STATE_HISTOGRAM_BINS
from lossd.kernels.state import check_state, merge_fields
from lossd.server.convert import state_from_proto

F64, I64 = torch.float64, torch.int64


def _check(state: State) -> None:
    fdef = get_function(state.function)
    check_state(state, fdef.fields, resolve_params(fdef.params, json.loads(state.params), "p"), "state")


def _multiclass(n: int = 8, k: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"logits": rng.standard_normal((n, k)).astype(np.float32), "labels": np.arange(n) % k}


BINARY = {"logits": np.array([0.1, 0.9, -1.0, 2.0], np.float32), "targets": np.array([0.0, 1.0, 0.0, 1.0], np.float32)}


def _state(name: str, arrays: dict[str, np.ndarray] | None = None, params: dict[str, object] | None = None) -> State:
    state = evaluate(arrays or _multiclass(), [{"name": name, "params": params or {}}], return_state=True)[name].state
    assert state is not None
    _check(state)  # the real state passes: the forged one differs in one field
    return state


def _r2() -> State:
    return _state("r2", {"predictions": np.arange(6.0), "targets": np.arange(6.0) ** 2})


def _forged(state: State, **fields: torch.Tensor) -> State:
    return State(state.function, state.version, state.params, {**state.fields, **fields}, state.batches)


def _refused(state: State, field: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as info:
        _check(state)
    assert info.value.violations[0].field == f"state.fields.{field}"


Forge = Callable[[], State]

# F6: exact AUROC / AP states keep int64 class indices in [0, K) (binary: {0, 1}) and float64 scores.
LABEL_CASES: list[tuple[str, Forge, str, str]] = [
    ("2**62", lambda: _forged(_state("auroc"), labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 2**62])), "labels", r"\[0, 4\).*got 4611"),
    ("-1", lambda: _forged(_state("auroc"), labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, -1])), "labels", r"\[0, 4\).*got -1 at index 7"),
    ("K", lambda: _forged(_state("auroc"), labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 4])), "labels", r"\[0, 4\).*got 4 at index 7"),
    ("float", lambda: _forged(_state("auroc"), labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3.5], dtype=F64)), "labels", "int64, got float64"),
    ("int scores", lambda: _forged(_state("auroc"), scores=torch.ones(8, 4, dtype=I64)), "scores", "float64, got int64"),
    ("AP 99", lambda: _forged(_state("average_precision"), labels=torch.tensor([0, 1, 2, 3, 0, 1, 2, 99])), "labels", "got 99"),
    ("binary 5", lambda: _forged(_state("auroc", BINARY), labels=torch.tensor([0, 1, 5, 1])), "labels", r"\{0, 1\}.*got 5 at index 2"),
    ("fewer labels", lambda: _forged(_state("auroc"), labels=torch.zeros(7, dtype=I64)), "", "one row per score"),
    ("binned float labels", lambda: _forged(_state("auroc", params={"bins": 4}), labels=torch.zeros(0, dtype=F64)), "labels", "int64"),
]

# F7: fields that contradict each other, or a count that is not one.
CONSISTENCY_CASES: list[tuple[str, Forge, str, str]] = [
    ("histogram [7, 3]", lambda: _forged(_state("adaptive_ece"), histogram=torch.ones(7, 3, dtype=F64)), "histogram", r"\[1000, 3\]"),
    ("exact=7", lambda: _forged(_state("adaptive_ece"), exact=torch.tensor(7.0, dtype=F64)), "exact", "nonempty_updates=1.*got 7.0"),
    (
        "no update behind its rows",  # nonempty_updates=0 would make the forged exact the value
        lambda: _forged(_state("adaptive_ece"), exact=torch.tensor(0.0, dtype=F64), nonempty_updates=torch.tensor(0.0, dtype=F64)),
        "nonempty_updates",
        "expected 1 to 8 .*got 0",
    ),
    (
        "r2 n=inf, M2 finite",
        lambda: _forged(_r2(), targets=torch.tensor([[np.inf, 0.0, 1.0]], dtype=F64)),
        "targets",
        "infinite only beside",
    ),
    (
        "more updates than rows",
        lambda: _forged(_state("adaptive_ece"), nonempty_updates=torch.tensor(9.0, dtype=F64)),
        "nonempty_updates",
        "expected 1 to 8 .*got 9",
    ),
    (
        "exact over two updates",
        lambda: _forged(_state("adaptive_ece"), exact=torch.tensor(2.5, dtype=F64), nonempty_updates=torch.tensor(2.0, dtype=F64)),
        "exact",
        "nonempty_updates=2 .*got 2.5",
    ),
    (
        "ece bin (1, 5, 7)",
        lambda: _forged(_state("ece"), bins=torch.ones(15, 3, dtype=F64) * torch.tensor([1.0, 5.0, 7.0], dtype=F64)),
        "bins",
        r"\[0, n\].*\[1.0, 5.0, 7.0\] in bin \[0\]",
    ),
    ("ece bin n=0.5", lambda: _forged(_state("ece"), bins=torch.full((15, 3), 0.5, dtype=F64)), "bins", "whole counts n.*got 0.5"),
    ("nan_rows=0.5", lambda: _forged(_state("auroc"), nan_rows=torch.tensor(0.5, dtype=F64)), "nan_rows", "whole counts, got 0.5"),
    ("nan_rows without NaN", lambda: _forged(_state("auroc"), nan_rows=torch.tensor(2.0, dtype=F64)), "nan_rows", "expected 0.*got 2.0"),
    (
        "positives 0.5",
        lambda: _forged(_state("auroc", params={"bins": 4}), positives=torch.full((4, 4), 0.5, dtype=F64)),
        "positives",
        "0.5",
    ),
    (
        "matrix all inf",
        lambda: _forged(_state("confusion_matrix"), matrix=torch.full((4, 4), np.inf, dtype=F64)),
        "matrix",
        "count=8.*got 16",
    ),
    ("ce weight=inf", lambda: _forged(_state("cross_entropy"), weight=torch.tensor(np.inf, dtype=F64)), "weight", "finite weight"),
    ("ce count=2.5", lambda: _forged(_state("cross_entropy"), count=torch.tensor(2.5, dtype=F64)), "count", "whole counts, got 2.5"),
]


@pytest.mark.parametrize(
    ("forge", "field", "match"), [c[1:] for c in LABEL_CASES + CONSISTENCY_CASES], ids=[c[0] for c in LABEL_CASES + CONSISTENCY_CASES]
)
def test_forged_state_is_refused_on_its_field(forge: Forge, field: str, match: str) -> None:
    state = forge()
    if field:
        _refused(state, field, match)
    else:
        with pytest.raises(InvalidInput, match=match) as info:
            _check(state)
        assert info.value.violations[0].field == "state.fields"


def test_zero_batches_are_refused_not_read_as_one() -> None:
    wire = state_to_proto(_state("cross_entropy"))
    assert state_from_proto(wire, "states[0].state").batches == 1
    wire.batches = 0
    with pytest.raises(InvalidInput, match=r"\[1, 2\^40\], got 0") as info:
        state_from_proto(wire, "states[0].state")
    assert info.value.violations[0].field == "states[0].state.batches"


def test_sums_within_rounding_of_their_counts_pass() -> None:
    ece = _state("ece")
    bins = ece.fields["bins"].clone()
    bins[0] = torch.tensor([3.0, 3.0 * (1 + 1e-12), 3.0], dtype=F64)  # a float64 sum of confidences just past n
    _check(_forged(ece, bins=bins))
    bins[0, 1] = float("nan")  # a NaN confidence propagates into its bin: still a real state
    _check(_forged(ece, bins=bins))


def test_histogram_size_is_the_calibration_one() -> None:
    assert STATE_HISTOGRAM_BINS == ADAPTIVE_HISTOGRAM_BINS


def _non_finite_variants(arrays: dict[str, np.ndarray], weighted: bool) -> list[dict[str, np.ndarray]]:
    """``arrays`` with ±inf or NaN in the first element of each float tensor, and with inf or NaN sample weights."""
    out = []
    for name, a in arrays.items():
        if a.dtype.kind == "f" and a.size:
            for v in (np.inf, -np.inf, np.nan):
                b = a.copy()
                b.reshape(-1)[0] = v
                out.append({**arrays, name: b})
    if weighted and "weights" not in arrays:
        rows = next(iter(arrays.values())).shape[0]
        for v in (np.inf, np.nan):
            out.append({**arrays, "weights": np.array([v] + [1.0] * (rows - 1), np.float32)})
    return out


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_real_states_with_non_finite_inputs_pass(name: str) -> None:
    fdef = get_function(name)
    weighted = any(r.name == "weights" for r in fdef.roles)
    clean = valid_inputs(name, np.random.default_rng(2))
    base = evaluate(clean, [name], return_state=True)[name].state
    assert base is not None
    for arrays in _non_finite_variants(clean, weighted):
        try:
            state = evaluate(arrays, [name], return_state=True)[name].state
        except InvalidInput:
            continue  # some functions refuse non-finite inputs outright
        assert state is not None
        _check(state)
        _check(merge_fields(base, state, fdef.fields))
