"""A client state whose field has another shape than the function's own update gives is refused, never an INTERNAL error.

For every function of the catalogue: its example batch's state, then each
field reshaped (a scalar made a vector, a vector given an extra element or an
extra dimension), sent through the server's state decoding and checks
(``state_from_proto``, as Finalize and prior_states read them) and finalized. The answer is INVALID_ARGUMENT naming the
field, or, where that layout is one the function can produce (a per-class
vector of another length), a value; any other exception is a lossd bug.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossd.kernels import all_functions, evaluate, finalize_states
from lossd.kernels.errors import InvalidInput
from lossd.kernels.state import State
from lossd.server.convert import state_from_proto, state_to_proto

FUNCTIONS = sorted(f.name for f in all_functions())


def _example_state(name: str) -> State:
    fdef = next(f for f in all_functions() if f.name == name)
    arrays = fdef.example.make(np.random.default_rng(0), 12)
    evaluation = evaluate({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, [name], return_state=True)
    state = evaluation.results[name].state
    assert state is not None
    return state


def _forgeries(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    values = [("negative", -t - 1)] + (
        [("NaN", torch.full_like(t, float("nan"))), ("infinite", torch.full_like(t, float("inf")))] if t.is_floating_point() else []
    )
    if t.ndim == 0:
        return [("a vector", t.reshape(1).repeat(2)), ("an empty vector", t.reshape(1)[:0]), *values]
    if t.numel() == 0:  # an empty field (e.g. no positive scores yet)
        return [("a scalar", torch.zeros((), dtype=t.dtype)), ("an extra dimension", t.unsqueeze(0)), *values]
    shapes = [
        ("one more element", torch.cat([t, t[:1]])),
        ("one element fewer", t[:-1]),
        ("empty", t[:0]),
        ("a scalar", t.reshape(-1)[0]),
        ("an extra dimension", t.unsqueeze(0).repeat((2,) + (1,) * t.ndim)),
    ]
    if t.ndim >= 2:
        shapes.append(("flattened", t.reshape(-1)))
        shapes.append(("its last dimension longer", torch.cat([t, t[..., :1]], dim=-1)))
    return shapes + values


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_reshaped_field_is_refused_or_finalized(name: str) -> None:
    state = _example_state(name)
    escaped = []
    for field, t in state.fields.items():
        for what, forged in _forgeries(t):
            fields = {**state.fields, field: forged}
            bad = State(state.function, state.version, state.params, fields, state.batches)
            try:
                finalize_states([(name, state_from_proto(state_to_proto(bad), "states[0].state"))])
            except InvalidInput:
                pass
            except Exception as exc:  # noqa: BLE001  (the point: nothing else may escape)
                escaped.append(f"field {field!r} as {what}: {type(exc).__name__}: {exc}")
    assert not escaped, f"{name}: " + "; ".join(escaped)
