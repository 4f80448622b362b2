"""Every float parameter at the ends of its declared range, on float16, bfloat16 and float32 inputs: a value or INVALID_ARGUMENT.

A parameter is a Python float; torch refuses to apply one that the tensor's
dtype cannot hold (``clamp(min=1e5)`` on float16 raises). Such a request must
be refused naming the parameter, never end in an internal error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossd.kernels import all_functions, evaluate
from lossd.kernels.errors import InvalidInput

EXTREMES = (1e5, 1e30, 1e300, -1e5, -1e30, -1e300)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _values(param) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for v in EXTREMES:
        if param.minimum is not None and (v < param.minimum or (param.exclusive_minimum and v == param.minimum)):
            continue
        if param.maximum is not None and (v > param.maximum or (param.exclusive_maximum and v == param.maximum)):
            continue
        out.append(v)
    for bound in (param.minimum, param.maximum):
        if bound is not None:
            out.append(float(bound))
    return out


CASES = [(f, p.name) for f in all_functions() for p in f.params if p.kind == "float"]


@pytest.mark.parametrize(("fdef", "name"), CASES, ids=[f"{f.name}.{n}" for f, n in CASES])
def test_extreme_float_params_are_computed_or_refused(fdef, name: str) -> None:  # type: ignore[no-untyped-def]
    param = next(p for p in fdef.params if p.name == name)
    arrays = fdef.example.make(np.random.default_rng(0), 12)
    escaped = []
    for dtype in DTYPES:
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        for value in _values(param):
            spec = {"name": fdef.name, "params": {name: value}}
            try:
                evaluate(tensors, [spec])
            except InvalidInput:
                pass
            except Exception as exc:  # noqa: BLE001  (the point: nothing else may escape)
                escaped.append(f"{name}={value:g} on {dtype}: {type(exc).__name__}: {exc}")
    assert not escaped, f"{fdef.name}: " + "; ".join(escaped)
