"""Pair losses on batches without a valid pair: value 0, counted in the state, reported at finalize.

pytorch-metric-learning, the oracle of ``nt_xent``, ``supcon``,
``multi_similarity`` and ``circle``, returns a loss of 0 for a batch on which
the loss has no term: a single embedding, and for the losses that need both
kinds of pair, every label equal (no negative pair) or every label distinct
(no positive pair).  lossd follows it, so one small final batch or a rare
class does not fail a whole stream: such a batch contributes 0 and counts as
a batch in the mean of per-batch values, and the state counts how many
batches had no valid pair, and which kind, so merged states keep the totals
and the ``no_valid_pair`` diagnostic reports them once, at finalize.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role
from lossd.kernels.params import Param
from lossd.kernels.reduce import MEAN_FIELDS, finalize_mean
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["NO_PAIR_FIELDS", "NO_PAIR_RULE", "PairLossValue", "missing_pairs", "pair_loss"]

# State field -> what the batches it counts lacked (in the diagnostic's words).
NO_PAIR_FIELDS: dict[str, str] = {
    "single_row_batches": "a single embedding",
    "no_positive_batches": "every label distinct: no positive pair",
    "no_negative_batches": "every label equal: no negative pair",
}
NO_PAIR_RULE = "a batch with no valid pair contributes 0 and counts as a batch, as pytorch-metric-learning does"

# A loss's value on one batch, and the NO_PAIR_FIELDS entry it had no valid pair by ("" when it had one).
PairLossValue = tuple[torch.Tensor, str]


def missing_pairs(y: torch.Tensor, *, needs_both: bool) -> str:
    """Why labels ``y`` [N] give a pair loss no term: a NO_PAIR_FIELDS name, or "" when there is one.

    ``needs_both``: the loss needs a positive and a negative pair (PML's NTXent,
    SupCon and Circle losses); otherwise any pair of rows will do (MultiSimilarity)."""
    if y.numel() < 2:
        return "single_row_batches"
    if not needs_both:
        return ""
    counts = torch.unique(y, return_counts=True)[1]
    if counts.numel() == 1:
        return "no_negative_batches"
    if not bool((counts > 1).any()):
        return "no_positive_batches"
    return ""


def _no_pair_diagnostics(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    counts = {name: int(float(fields[name])) for name in NO_PAIR_FIELDS}
    total = sum(counts.values())
    if total == 0:
        return []
    kinds = ", ".join(f"{n} with {NO_PAIR_FIELDS[name]}" for name, n in counts.items() if n)
    batches = int(float(fields["count"]))
    return [
        (
            "no_valid_pair",
            f"{total} of {batches} batches had no valid pair ({kinds}); each contributes 0 and counts as a batch "
            "in the mean of per-batch values, as in pytorch-metric-learning",
        )
    ]


def pair_loss(
    *,
    name: str,
    summary: str,
    roles: tuple[Role, ...],
    params: tuple[Param, ...],
    value: Callable[[View, Mapping[str, Any]], PairLossValue],
    reference: str,
    example: Example,
    needs_both: bool,
) -> FunctionDef:
    """Declare a non-splittable pair loss whose batches may have no valid pair (see the module docstring).

    ``value`` checks the inputs and returns the batch's loss with "" or, for a
    batch without a valid pair, 0 with the NO_PAIR_FIELDS name of what it lacked.
    The state is (Σ per-batch values, batch count) plus one count per kind.
    ``needs_both`` says, in ListFunctions, which batches have a valid pair
    (``value`` decides with :func:`missing_pairs` and the same flag)."""
    valid = "a positive and a negative pair" if needs_both else "at least two rows"

    def update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        loss, missing = value(view, p)
        one = torch.tensor(1.0, dtype=torch.float64)
        fields = {"total": loss.to(torch.float64).reshape(()).cpu(), "weight": one, "count": one.clone()}
        fields.update({f: torch.tensor(float(f == missing), dtype=torch.float64) for f in NO_PAIR_FIELDS})
        return fields

    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        return finalize_mean(fields, "mean", "batches")

    return FunctionDef(
        name=name,
        family="embedding",
        summary=f"{summary}; a batch needs {valid}, and {NO_PAIR_RULE}",
        roles=roles,
        params=params,
        outputs=(Output("value", f"the batch loss; over several batches, the mean of per-batch values ({NO_PAIR_RULE})"),),
        fields={**MEAN_FIELDS, **dict.fromkeys(NO_PAIR_FIELDS, MergeOp.SUM)},
        update=update,
        finalize=finalize,
        reference=reference,
        example=example,
        splittable=False,
        state_version=2,  # version 1 states lack the no-valid-pair counts
        finalize_diagnostics=_no_pair_diagnostics,
    )
