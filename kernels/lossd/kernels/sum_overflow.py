"""A state sum that overflowed float64 from finite inputs: said, and the values it made meaningless are NaN.

Weights of 1e308 are finite, but their sum is not: the weighted mean
``Σ w·l / Σ w`` then came out NaN (inf / inf) or 0 (finite / inf), with
nothing said, and a run whose totals pass 1.8e308 over many batches did the
same when merged. Here that is the ``sum_overflow`` error diagnostic, and
the function's values are NaN. Inputs that held inf themselves
(``nan_or_inf``) or loss terms that overflowed (``overflow``) are said
already where they were computed, so they are not said again.

Only a finalize whose denominator or values are not finite looks further:
the common finite case costs a float comparison or two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from lossd.kernels.declarations import Result
from lossd.kernels.diagnostics import Diagnostics
from lossd.kernels.prepared import Prepared
from lossd.kernels.state import MergeOp

__all__ = ["diagnose_sum_overflow"]

_SAID = frozenset({"nan_or_inf", "overflow", "sum_overflow"})  # an infinity these explain is not an overflow of the sums


def diagnose_sum_overflow(p: Prepared, fields: Mapping[str, torch.Tensor], result: Result, diagnostics: Diagnostics) -> Result:
    """``result``, or the same with NaN values and ``sum_overflow`` said when its sums overflowed to inf.

    A mean's denominator (a count or a sum of weights, never negative) that is inf
    overflowed. A loss sum may be inf for a reason of its own (an infeasible CTC
    alignment, a label of probability 0), so for a function without a denominator
    it is a SUM field that is inf under a value that is not finite."""
    if result.denominator is not None:
        if not math.isinf(result.denominator):
            return result
        overflowed = [result.denominator_kind or "denominator"]
    else:
        if all(math.isfinite(v) for v in result.values.values()):
            return result
        overflowed = [
            name
            for name, op in p.fdef.fields.items()
            if op is MergeOp.SUM and fields[name].is_floating_point() and bool(torch.isinf(fields[name]).any())
        ]
        if not overflowed:
            return result  # a NaN of the function's own (an empty batch, a single class): its own diagnostics say why
    if any(d.code in _SAID and d.function in ("", p.alias) for d in diagnostics):
        return result
    diagnostics.add(
        "sum_overflow",
        f"the sum(s) {', '.join(map(repr, overflowed))} are inf with no inf input seen here: a sum of finite values"
        " overflowed float64 (past 1.8e308), or a state merged here brought the inf from its own batch; the values are"
        " NaN. Scale the weights (or the inputs) down: a weighted mean is the same when every weight is scaled by one factor",
        function=p.alias,
    )
    return dataclasses.replace(result, values={k: math.nan for k in result.values}, numerator=None)
