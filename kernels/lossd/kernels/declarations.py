"""The declaration types of a function: its roles, outputs, result and :class:`FunctionDef`.

A :class:`FunctionDef` says everything the service, the CLI and ListFunctions
need: the roles (input tensors) it reads, its parameters, its outputs, how its
state merges, whether a batch may be split, the reference its values are
tested against, and an :class:`Example` of valid inputs.  ``update`` turns a
batch (seen through a :class:`~lossd.kernels.view.View`) into state fields;
``finalize`` turns merged fields into values.

There are three ways to declare a function, and family modules use only these:

1. ``FunctionDef(...)`` itself, for any state and finalize (ECE bins, AUROC
   scores, confusion matrices, moments).  A family may build several from one
   private function when they differ only in a name and formula (precision,
   recall, f1).
2. :func:`lossd.kernels.reduce.mean_loss`, for a value that is a weighted mean
   of per-element terms: the function computes the terms, ``mean_loss`` adds
   the ``weights`` role, the mergeable state, the ``reduction`` parameter (or
   none, for metrics: ``reduction=False``) and the ``all_ignored`` diagnostic.
3. :func:`lossd.kernels.reduce.batch_loss`, for a non-splittable loss whose
   value depends on the whole batch (in-batch negatives).

Each family module lists its functions in a ``FUNCTIONS`` tuple; nothing is
registered by importing a module.  :mod:`lossd.kernels.catalogue` names the
family modules and :mod:`lossd.kernels.registry` builds the lookup from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lossd.kernels.batch import Batch
from lossd.kernels.budget import MemoryFn
from lossd.kernels.params import Param
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = [
    "FAMILIES",
    "Role",
    "Output",
    "Result",
    "Example",
    "FunctionDef",
    "UpdateFn",
    "FinalizeFn",
    "PerElementFn",
    "FinalizeDiagnosticsFn",
    "no_valid_element",
]

FAMILIES = (
    "regression",
    "binary",
    "classification",
    "sequence",
    "embedding",
    "preference",
    "metric",
    "calibration",
)


@dataclass(frozen=True)
class Role:
    """One input tensor a function reads.

    ``dtype`` is "float" (any floating dtype), "index" (integer class indices;
    floats holding integers are accepted and cast), "binary" (0/1 values,
    float or int or bool) or "any".  Optional roles that share a ``one_of``
    name are alternatives: one of them must be sent (labels or targets), so an
    error about the missing truth may name any of them.
    """

    name: str
    shape: str
    dtype: str = "float"
    doc: str = ""
    optional: bool = False
    one_of: str = ""


@dataclass(frozen=True)
class Output:
    """A named output. Scalars are float64 values; tensors come back as arrays."""

    name: str
    doc: str
    tensor: bool = False


@dataclass
class Result:
    """The finalized values of one function."""

    values: dict[str, float] = field(default_factory=dict)  # "value" is the primary output
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> numpy array
    denominator: float | None = None  # the denominator of a mean, as used
    denominator_kind: str = ""  # samples | elements | valid_tokens | sequences | weights | batches | pairs
    # Set when the primary value is an additive mean: value = numerator / denominator
    # (or value = numerator under reduction="sum"), where numerator and denominator
    # are sums that merge by addition over batches, shards and replicas.  Monitoring
    # exports them as counters; None for values that are not such a mean (ECE,
    # AUROC, F1, perplexity = exp of a mean, RMSE, R², a fitted temperature).
    numerator: float | None = None


Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Example:
    """Valid, clean inputs of a function: what tests, docs and ``lossd`` examples send it.

    ``make(rng, n)`` returns a batch of about ``n`` samples as numpy arrays
    keyed by role name: random but clean (no diagnostic is raised on it).
    With ``rows`` the sample is dim 0 of every tensor not in ``shared``, so
    batches concatenate into one; ``shared`` names tensors that are the same
    for every batch of a run (retrieval candidates, class weights)."""

    make: Callable[[np.random.Generator, int], Arrays]
    shared: frozenset[str] = frozenset()
    rows: bool = True


UpdateFn = Callable[[View, Mapping[str, Any]], dict[str, torch.Tensor]]
FinalizeFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Result]
PerElementFn = Callable[[View, Mapping[str, Any]], torch.Tensor]
FinalizeDiagnosticsFn = Callable[[Mapping[str, Any], Mapping[str, Any]], list[tuple[str, str]]]


def no_valid_element(count: float, message: str) -> list[tuple[str, str]]:
    """The ``all_ignored`` finding when ``count`` (valid elements, rows, tokens, weight) is 0, else none.

    ``message`` says what was empty and what the value is then (NaN with denominator 0)."""
    return [("all_ignored", message)] if float(count) == 0 else []


@dataclass(frozen=True)
class FunctionDef:
    """The declaration of one function. See the module docstring."""

    name: str
    family: str
    summary: str
    roles: tuple[Role, ...]
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]
    fields: Mapping[str, MergeOp]
    update: UpdateFn
    finalize: FinalizeFn
    reference: str
    example: Example
    splittable: bool = True
    aliases: tuple[str, ...] = ()
    per_element: PerElementFn | None = None  # values for reduction="none"
    state_version: int = 1
    finalize_diagnostics: FinalizeDiagnosticsFn | None = None
    # For a function splittable only with some parameters (ppo_clip normalizing
    # advantages with batch statistics): False for the parameters that make a
    # batch's value depend on the whole batch.  ``splittable`` stays the default.
    splittable_if: Callable[[Mapping[str, Any]], bool] | None = None
    # (role -> input shape, params) -> Estimate of the bytes it allocates and returns, checked
    # against the server's budget before computing (lossd.kernels.budget); None: budget.chunked.
    memory: MemoryFn | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate role names {names}")

    def role(self, name: str) -> Role:
        """The declared role ``name`` (KeyError if there is none)."""
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def is_splittable(self, params: Mapping[str, Any]) -> bool:
        """Whether a batch may be split into parts and merged, with these resolved parameters."""
        return self.splittable and (self.splittable_if is None or self.splittable_if(params))

    @property
    def has_reduction(self) -> bool:
        """Whether the function takes the ``reduction`` parameter."""
        return any(p.name == "reduction" for p in self.params)

    def view(self, batch: Batch, index: int, alias: str, inputs: Mapping[str, str]) -> View:
        """The window of this function on ``batch``, as functions[index] of a request with role mapping ``inputs``."""
        return View(batch, self.name, {r.name: r.shape for r in self.roles}, index, alias, dict(inputs))
