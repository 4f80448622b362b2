"""The shared shape of most losses: per-element terms reduced to a weighted mean.

A loss written with :func:`mean_loss` only computes per-element values ℓ and
their weights w (0 removes an element, e.g. ``ignore_index``).  This module
does the rest the same way for every loss: the ``reduction`` parameter, the
optional ``weights`` role, the mergeable state (Σ w·ℓ, Σ w, count in
float64), ``reduction="none"`` and the ``all_ignored`` diagnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role, no_valid_element
from lossd.kernels.dtypes import as_dtype
from lossd.kernels.params import REDUCTION, Param
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["Terms", "mean_loss", "batch_loss", "MEAN_FIELDS", "weighted_sums", "finalize_mean", "all_ignored_check", "WEIGHTS_ROLE"]

MEAN_FIELDS = {"total": MergeOp.SUM, "weight": MergeOp.SUM, "count": MergeOp.SUM}

WEIGHTS_ROLE = Role(
    "weights", "[N] or a prefix of the per-element shape", "float", "non-negative per-sample weights; mean = Σw·ℓ / Σw", optional=True
)


@dataclass
class Terms:
    """Per-element loss values and weights (same shape; ``weight=None`` means all ones)."""

    loss: torch.Tensor
    weight: torch.Tensor | None = None
    # Σ-ready per-element w·ℓ when it is not simply weight × loss (torch's weighted
    # label smoothing weighs each class term by its own class weight).
    weighted: torch.Tensor | None = None

    def contributions(self, weight: torch.Tensor | None, sample_weight: torch.Tensor | None) -> torch.Tensor:
        """Per-element w·ℓ, exactly 0 where the weight is 0 (even if ℓ is inf or NaN there); ``weight`` None: all ones.

        A weight of ones is no weight: 1·ℓ is ℓ and no element is zeroed, so
        the terms are returned as they are (the multiply and the mask are four
        ops that a small request pays in full)."""
        if weight is None:
            return self.loss if self.weighted is None else self.weighted
        if self.weighted is None:
            c = weight * self.loss
        else:
            c = self.weighted if sample_weight is None else self.weighted * sample_weight
        return torch.where(weight != 0, c, torch.zeros_like(c))


def _weights(view: View, terms: Terms) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(effective weight, or None when every element weighs 1; sample weight or None) for the terms' elements."""
    sw = view.sample_weights(terms.loss.shape, terms.loss.dtype) if "weights" in view.role_shapes else None
    if terms.weight is None and sw is None and _summed_as_is(terms.loss if terms.weighted is None else terms.weighted):
        return None, None
    w = torch.ones_like(terms.loss) if terms.weight is None else as_dtype(terms.weight, terms.loss.dtype)
    if sw is not None:
        w = w * sw
    return w, sw


def _summed_as_is(t: torch.Tensor) -> bool:
    """Whether ``t`` sums in the order the product w·ℓ would: when it is contiguous.

    A strided or broadcast view may be summed in another order than the fresh tensor of a product."""
    return t.is_contiguous()


def _on_cpu(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


def weighted_sums(contributions: torch.Tensor, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The mean-loss state: Σ w·ℓ, Σ w and the count of elements of non-zero weight, in float64 (``weight`` None: all ones).

    A weight of ones sums to the element count, exactly in float64 (counts
    below 2^53), and every element counts: the same fields without the passes."""
    total = _on_cpu(as_dtype(contributions, torch.float64).sum())
    if weight is None:
        n = float(contributions.numel())
        return {"total": total, "weight": torch.scalar_tensor(n, dtype=torch.float64), "count": torch.scalar_tensor(n, dtype=torch.float64)}
    return {
        "total": total,
        "weight": _on_cpu(as_dtype(weight, torch.float64).sum()),
        "count": _on_cpu((weight != 0).sum().to(torch.float64)),
    }


def finalize_mean(fields: Mapping[str, torch.Tensor], reduction: str, denominator_kind: str) -> Result:
    """Σ w·ℓ / Σ w (or Σ w·ℓ for reduction="sum"), declaring Σ w·ℓ as the additive numerator."""
    total, weight = float(fields["total"]), float(fields["weight"])
    if reduction == "sum":
        return Result({"value": total}, denominator=weight, denominator_kind=denominator_kind, numerator=total)
    value = total / weight if weight != 0 else float("nan")
    return Result({"value": value}, denominator=weight, denominator_kind=denominator_kind, numerator=total)


def all_ignored_check(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """all_ignored for a mean of no element of non-zero weight (a sum of none is 0, not a finding)."""
    if params.get("reduction", "mean") != "mean":
        return []
    return no_valid_element(
        float(fields["weight"]), "no element had non-zero weight (all ignored or zero-weighted); the mean is NaN with denominator 0"
    )


def mean_loss(
    *,
    name: str,
    family: str,
    summary: str,
    roles: tuple[Role, ...],
    params: tuple[Param, ...],
    terms: Callable[[View, Mapping[str, Any]], Terms],
    reference: str,
    example: Example,
    denominator_kind: str = "samples",
    aliases: tuple[str, ...] = (),
    sample_weights: bool = True,
    splittable: bool = True,
    reduction: bool = True,
    doc: str = "the reduced loss",
) -> FunctionDef:
    """Declare a function whose value is Σ w·ℓ / Σ w (or Σ w·ℓ, or per-element ℓ·w).

    ``reduction=False`` declares a metric: no ``reduction`` parameter (always
    the mean) and no per-element values.  ``doc`` describes the value."""

    def update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        t = terms(view, p)
        w, sw = _weights(view, t)
        return weighted_sums(t.contributions(w, sw), w)

    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        kind = "weights" if denominator_kind == "samples" and float(fields["weight"]) != float(fields["count"]) else denominator_kind
        return finalize_mean(fields, p["reduction"] if reduction else "mean", kind)

    def per_element(view: View, p: Mapping[str, Any]) -> torch.Tensor:
        t = terms(view, p)
        w, sw = _weights(view, t)
        # Weighted or not, a new tensor: the values returned must never alias the terms (or an input).
        return t.contributions(torch.ones_like(t.loss) if w is None else w, sw)

    return FunctionDef(
        name=name,
        family=family,
        summary=summary,
        roles=roles + ((WEIGHTS_ROLE,) if sample_weights else ()),
        params=params + ((REDUCTION,) if reduction else ()),
        outputs=(Output("value", doc),),
        fields=MEAN_FIELDS,
        update=update,
        finalize=finalize,
        per_element=per_element if reduction else None,
        reference=reference,
        example=example,
        aliases=aliases,
        splittable=splittable,
        finalize_diagnostics=all_ignored_check,
    )


def batch_loss(
    *,
    name: str,
    family: str,
    summary: str,
    roles: tuple[Role, ...],
    params: tuple[Param, ...],
    value: Callable[[View, Mapping[str, Any]], torch.Tensor],
    reference: str,
    example: Example,
    aliases: tuple[str, ...] = (),
) -> FunctionDef:
    """Declare a non-splittable loss: its value depends on the whole batch (in-batch negatives).

    ``value`` returns the batch's scalar loss.  The state is (Σ per-batch
    values, batch count), so a stream or run reports the mean over batches
    and says so (denominator kind ``batches``); a batch is never split."""

    def update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        v = value(view, p).to(torch.float64).reshape(()).cpu()
        one = torch.tensor(1.0, dtype=torch.float64)
        return {"total": v, "weight": one, "count": one}

    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        return finalize_mean(fields, "mean", "batches")

    return FunctionDef(
        name=name,
        family=family,
        summary=summary,
        roles=roles,
        params=params,
        outputs=(Output("value", "the batch loss; over several batches, the mean of per-batch values"),),
        fields=MEAN_FIELDS,
        update=update,
        finalize=finalize,
        reference=reference,
        example=example,
        aliases=aliases,
        splittable=False,
    )
