"""The client's chunking keeps every value: chunked and unsplit evaluations agree for the whole catalogue.

``Client.evaluate`` splits a batch over ``chunk_bytes`` into parts when every
function is splittable (as ListFunctions says), and promises the same values
as the unsplit batch.  For every function of the registry, its declared
example batch (float64, so that only the order of summation differs) is sent
with a tiny chunk size and compared with the same batch sent whole.  A
function declared non-splittable must go whole: the recording interceptor
sees a unary ``Evaluate``, never an ``EvaluateStream`` of parts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from integration.wire_recording import MethodRecorder

from lossd.client import Client
from lossd.kernels import all_functions
from tests.helpers import assert_close
from tests.integration.conftest import ServerThread

FUNCTIONS = all_functions()
ROWS = 24  # enough rows for many parts of a tiny chunk, every class present
CHUNK_BYTES = 64  # a few rows per part
RTOL = 1e-9  # float64 inputs: the parts change only the order of summation


def _float64(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}


def _same_leading_dim(arrays: dict[str, np.ndarray]) -> bool:
    """Whether the client can split this batch at all (every tensor shares dim 0)."""
    return all(a.ndim > 0 for a in arrays.values()) and len({a.shape[0] for a in arrays.values()}) == 1


@pytest.mark.parametrize("fdef", FUNCTIONS, ids=[f.name for f in FUNCTIONS])
def test_chunked_evaluate_equals_unsplit(recorded: tuple[ServerThread, MethodRecorder], fdef: object) -> None:
    from lossd.kernels.declarations import FunctionDef

    assert isinstance(fdef, FunctionDef)
    server, recorder = recorded
    arrays = _float64(fdef.example.make(np.random.default_rng(7), ROWS))
    with Client(server.address, timeout=60, chunk_bytes=None) as whole:
        expected = whole.evaluate(arrays, fdef.name)[fdef.name]
    recorder.methods.clear()
    with Client(server.address, timeout=60, chunk_bytes=CHUNK_BYTES) as chunky:
        got = chunky.evaluate(arrays, fdef.name)[fdef.name]
    calls = [m for m in recorder.methods if m != "ListFunctions"]
    if not fdef.splittable or fdef.splittable_if is not None:
        assert calls == ["Evaluate"], f"{fdef.name} is not splittable but went as {calls}"
    elif _same_leading_dim(arrays):
        assert calls == ["EvaluateStream"], f"{fdef.name} is splittable and over the chunk size, but went as {calls}"
    assert set(got.values) == set(expected.values), fdef.name
    for name, value in expected.values.items():
        if math.isnan(value):
            assert math.isnan(got.values[name]), f"{fdef.name}.{name}: unsplit NaN, chunked {got.values[name]}"
        else:
            assert_close(got.values[name], value, rtol=RTOL, atol=1e-12, what=f"{fdef.name}.{name} chunked vs unsplit")
    assert set(got.tensors) == set(expected.tensors), fdef.name
    for name, tensor in expected.tensors.items():
        np.testing.assert_allclose(got.tensors[name], tensor, rtol=RTOL, atol=1e-12, err_msg=f"{fdef.name}.{name}")
    assert got.denominator == pytest.approx(expected.denominator, rel=RTOL), fdef.name
    assert got.denominator_kind == expected.denominator_kind, fdef.name


def test_adaptive_ece_stays_exact_when_the_batch_is_large(recorded: tuple[ServerThread, MethodRecorder]) -> None:
    """The issue's case: a large batch stays one exact equal-mass estimate, with no binned_estimate."""
    server, _ = recorded
    rng = np.random.default_rng(3)
    arrays = {"logits": rng.standard_normal((400, 4)), "labels": rng.integers(0, 4, 400)}
    with Client(server.address, timeout=60, chunk_bytes=256) as c:
        out = c.evaluate(arrays, "adaptive_ece")
    assert out["adaptive_ece"].values["exact"] == 1.0
    assert "binned_estimate" not in [d.code for d in out.diagnostics]
