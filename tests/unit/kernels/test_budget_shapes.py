"""Every function's memory estimate takes any shape a request can declare (0-dim, empty, long) without failing.

Estimates run before the inputs are checked (that is their point), so a shape
the function will refuse must still be estimated, never raise.
"""

from __future__ import annotations

import itertools

import pytest

from lossd.kernels import all_functions
from lossd.kernels.budget import estimates
from lossd.kernels.evaluate import prepare

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (1, 1, 1, 1, 9), (2**20, 2**10)]


class Declared:
    """A tensor as a request declares it: a shape and nothing else."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


@pytest.mark.parametrize("fdef", all_functions(), ids=lambda f: f.name)
def test_estimates_take_any_declared_shape(fdef) -> None:  # type: ignore[no-untyped-def]
    prepared = prepare([fdef.name])
    roles = [r.name for r in fdef.roles]
    for shape_a, shape_b in itertools.product(SHAPES, repeat=2):
        tensors = {role: Declared(shape_a if i % 2 == 0 else shape_b) for i, role in enumerate(roles)}
        for alias, estimate in estimates(prepared, tensors):
            assert estimate.memory >= 0 and estimate.response >= 0, (alias, shape_a, shape_b, estimate)
