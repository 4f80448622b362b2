"""A valid, well-formed batch for every registered function, read from its declaration.

Shared by the diagnostics tests (clean data raises no diagnostic) and the
catalogue-wide error tests (each error case breaks one role of a request that
is otherwise valid).  The inputs are each function's declared
:class:`~lossd.kernels.declarations.Example`; ``ROLE_GROUPS`` names, per
function, the optional roles of which one must be sent (``Role.one_of``: a
missing group is reported under any of its names).  Nothing here is kept by
hand per function: a new function brings its example with its declaration.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lossd.kernels import all_functions, get_function

__all__ = ["valid_inputs", "INPUTS", "ROLE_GROUPS"]

Arrays = dict[str, np.ndarray]
Maker = Callable[[np.random.Generator, int], Arrays]

INPUTS: dict[str, Maker] = {f.name: f.example.make for f in all_functions()}

ROLE_GROUPS: dict[str, frozenset[str]] = {
    f.name: frozenset(r.name for r in f.roles if r.one_of) for f in all_functions() if any(r.one_of for r in f.roles)
}


def valid_inputs(name: str, rng: np.random.Generator, n: int = 12) -> Arrays:
    """Make a valid batch of about ``n`` rows for the function ``name`` (or one of its aliases)."""
    return get_function(name).example.make(rng, n)
