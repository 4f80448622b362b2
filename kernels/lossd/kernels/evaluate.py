"""Evaluate functions over tensors, accumulate states over batches, finalize merged states.

This is the whole in-process API the gRPC servicer calls, so users calling
``lossd.kernels`` directly get bit-for-bit the numbers the service returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from lossd.kernels.batch import Batch, entropy_wanted
from lossd.kernels.budget import Budget, Estimated
from lossd.kernels.declarations import Result
from lossd.kernels.diagnostics import Diagnostic, Diagnostics
from lossd.kernels.dtypes import to_torch
from lossd.kernels.errors import FieldViolation, InvalidInput
from lossd.kernels.nan_policy import DEFAULT_NAN_POLICY, check_nan_policy, check_omit, first_nonfinite, function_batches
from lossd.kernels.params import resolve_params
from lossd.kernels.prepared import Prepared
from lossd.kernels.registry import get_function
from lossd.kernels.spans import function_span
from lossd.kernels.state import State, merge_fields, merge_many
from lossd.kernels.sum_overflow import diagnose_sum_overflow
from lossd.kernels.tensor_names import check_all_read

__all__ = [
    "FunctionSpec",
    "FunctionResult",
    "Evaluation",
    "Accumulator",
    "evaluate",
    "finalize_states",
    "prepare",
    "PreparedSpecs",
    "to_torch",
    "DEFAULT_EXACT_STATE_LIMIT",
]

# Scores an exact (unbinned) AUROC/AP state may hold across a stream or run.
DEFAULT_EXACT_STATE_LIMIT = 10_000_000


@dataclass(frozen=True)
class FunctionSpec:
    """What to compute: a function name, its parameters, role -> tensor-name mapping and an alias."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    alias: str = ""


@dataclass
class FunctionResult:
    """The values of one requested function (by alias), with its denominator and, when asked for, its state."""

    alias: str
    function: str
    values: dict[str, float]
    tensors: dict[str, np.ndarray]
    denominator: float | None
    denominator_kind: str
    state: State | None = None
    # See :class:`lossd.kernels.declarations.Result`: set only when ``value`` is an additive mean.
    numerator: float | None = None

    @property
    def value(self) -> float:
        return self.values.get("value", math.nan)


@dataclass
class Evaluation:
    """The results of one evaluation by alias, its diagnostics and how many batches it covers."""

    results: dict[str, FunctionResult]
    diagnostics: list[Diagnostic]
    batches: int = 1
    # The evaluated batch with its memoized intermediates (row statistics) and the
    # prepared specs (role -> tensor mappings), for subscribers such as monitoring
    # that must not recompute what the evaluation computed.  None after Finalize.
    batch: Batch | None = field(default=None, repr=False, compare=False)
    prepared: tuple[Prepared, ...] = field(default=(), repr=False, compare=False)

    def __getitem__(self, alias: str) -> FunctionResult:
        return self.results[alias]


def as_spec(spec: FunctionSpec | str | Mapping[str, Any]) -> FunctionSpec:
    if isinstance(spec, FunctionSpec):
        return spec
    if isinstance(spec, str):
        return FunctionSpec(spec)
    return FunctionSpec(spec["name"], dict(spec.get("params") or {}), dict(spec.get("inputs") or {}), spec.get("alias") or "")


class PreparedSpecs(tuple[Prepared, ...]):
    """Function specs :func:`prepare` validated; :func:`prepare` (hence :func:`evaluate` and :class:`Accumulator`) takes them as they are.

    Immutable all the way down (frozen Prepared, read-only params and inputs),
    so one instance may serve many requests: the server keeps those of its
    recent requests instead of validating the same specs on every call."""

    __slots__ = ()


# What the evaluation entry points take: specs to validate, or specs prepare() validated before.
Specs = Sequence[FunctionSpec | str | Mapping[str, Any]] | PreparedSpecs


def prepare(specs: Specs) -> PreparedSpecs:
    """Validate function specs: known names, known roles, valid parameters, unique aliases (PreparedSpecs: already done)."""
    if isinstance(specs, PreparedSpecs):
        return specs
    if not specs:
        raise InvalidInput.single("functions", "expected at least one function to evaluate, got none")
    prepared: list[Prepared] = []
    seen: dict[str, int] = {}
    violations: list[FieldViolation] = []
    for i, raw in enumerate(specs):
        spec = as_spec(raw)
        path = f"functions[{i}]"
        try:
            fdef = get_function(spec.name, path)
            params = resolve_params(fdef.params, spec.params, f"{path}.params")
        except InvalidInput as exc:
            violations.extend(exc.violations)
            continue
        roles = {r.name for r in fdef.roles}
        for role in spec.inputs:
            if role not in roles:
                violations.append(
                    FieldViolation(
                        f"{path}.inputs.{role}", f"{fdef.name} has no role {role!r}; expected one of: {', '.join(sorted(roles))}"
                    )
                )
        alias = spec.alias or spec.name
        if alias in seen:
            violations.append(
                FieldViolation(
                    f"{path}.alias", f"alias {alias!r} is already used by functions[{seen[alias]}]; give one of them another alias"
                )
            )
        seen[alias] = i
        prepared.append(Prepared(i, fdef, MappingProxyType(params), MappingProxyType(dict(spec.inputs)), alias))
    if violations:
        raise InvalidInput(violations)
    return PreparedSpecs(prepared)


def _batch(prepared: PreparedSpecs, tensors: Mapping[str, Any], device: torch.device) -> Batch:
    """The batch of ``tensors`` on ``device``; a tensor no function reads is refused (lossd.kernels.tensor_names)."""
    check_all_read(prepared, tensors)
    on_device = {}
    for name, value in tensors.items():
        t = to_torch(value, name)
        on_device[name] = t.to(device, non_blocking=True) if t.device != device else t
    return Batch(on_device, device, entropy_for=entropy_wanted(prepared))


def _result_of(p: Prepared, fields: Mapping[str, torch.Tensor], diagnostics: Diagnostics) -> Result:
    with function_span("finalize", p.fdef.name, p.alias):
        result = p.fdef.finalize(fields, p.params)
    if p.fdef.finalize_diagnostics is not None:
        for code, message in p.fdef.finalize_diagnostics(fields, p.params):
            diagnostics.add(code, message, function=p.alias)
    return diagnose_sum_overflow(p, fields, result, diagnostics)


def _function_result(p: Prepared, result: Result, state: State | None) -> FunctionResult:
    return FunctionResult(
        p.alias,
        p.fdef.name,
        {k: float(v) for k, v in result.values.items()},
        {k: np.asarray(v) for k, v in result.tensors.items()},
        result.denominator,
        result.denominator_kind,
        state,
        None if result.numerator is None else float(result.numerator),
    )


@contextmanager
def _diagnostics_on_error(batch: Batch) -> Iterator[None]:
    """Attach the batch's diagnostics so far to an InvalidInput leaving the block.

    labels_out_of_range is both an error and a diagnostic, and a NaN seen
    before the error still matters to the caller.
    """
    try:
        yield
    except InvalidInput as exc:
        exc.diagnostics = list(batch.diagnostics)
        raise


def _update_fields(p: Prepared, batch: Batch) -> dict[str, torch.Tensor]:
    """The function's state fields for one batch, detached, on the CPU."""
    with function_span("update", p.fdef.name, p.alias):
        view = p.fdef.view(batch, p.index, p.alias, p.inputs)
        fields = p.fdef.update(view, p.params)
    missing = set(p.fdef.fields) - set(fields)
    if missing:  # a programming error in a function, never the caller's
        raise RuntimeError(f"{p.fdef.name}.update returned no field(s) {sorted(missing)}")
    # A field that needs no grad is detached already: detach() would only make another tensor object.
    return {k: (v.detach() if v.requires_grad else v) if v.device.type == "cpu" else v.detach().to("cpu") for k, v in fields.items()}


def _state(p: Prepared, fields: dict[str, torch.Tensor]) -> State:
    return State(p.fdef.name, p.fdef.state_version, p.state_params, fields)


def _update(p: Prepared, batch: Batch) -> State:
    return _state(p, _update_fields(p, batch))


def evaluate(
    tensors: Mapping[str, Any],
    functions: Specs,
    *,
    device: torch.device | str = "cpu",
    return_state: bool = False,
    prior_states: Mapping[str, State] | None = None,
    exact_state_limit: int = DEFAULT_EXACT_STATE_LIMIT,
    budget: Budget | Estimated | None = None,
    nan_policy: str = DEFAULT_NAN_POLICY,
) -> Evaluation:
    """Evaluate ``functions`` on one batch of ``tensors``.

    ``nan_policy`` (propagate, raise or omit) says what NaN and infinite
    values do (:mod:`lossd.kernels.nan_policy`).

    ``budget`` refuses the request before computing when the functions'
    estimated memory or response tensors exceed it (RequestBudgetExceeded);
    an :class:`~lossd.kernels.budget.Estimated` one brings the estimates made already.

    ``prior_states`` (alias -> State) are merged into this batch's states
    before finalizing: that is how a client run accumulates exact totals with
    one call per batch and no merge logic of its own."""
    policy = check_nan_policy(nan_policy)
    prepared = prepare(functions)
    check_omit(prepared, policy)
    device = torch.device(device)
    if budget is not None:
        budget.check(prepared, tensors)
    batch = _batch(prepared, tensors, device)
    results: dict[str, FunctionResult] = {}
    batches = 1
    with _diagnostics_on_error(batch):
        batch_of = function_batches(batch, prepared, policy)
        for p in prepared:
            if p.fdef.has_reduction and p.params["reduction"] == "none":
                if prior_states and p.alias in prior_states:
                    raise _none_reduction_error(p, "merged with a prior state")
                view = p.fdef.view(batch_of[p.index], p.index, p.alias, p.inputs)
                values = p.fdef.per_element(view, p.params)  # type: ignore[misc]
                results[p.alias] = FunctionResult(
                    p.alias, p.fdef.name, {}, {"value": values.detach().to("cpu", torch.float64).numpy()}, None, "elements", None
                )
                continue
            fields = _update_fields(p, batch_of[p.index])
            # A State (and its canonical parameter text, a JSON encoding) only when one is
            # merged or returned: a plain evaluation finalizes the fields themselves.
            state = None
            if prior_states and p.alias in prior_states:
                state = merge_fields(
                    prior_states[p.alias], _state(p, fields), p.fdef.fields, concat_limit=exact_state_limit, path=f"prior_states.{p.alias}"
                )
                fields = state.fields
                batches = max(batches, state.batches)
            elif return_state:
                state = _state(p, fields)
            result = _result_of(p, fields, batch.diagnostics)
            results[p.alias] = _function_result(p, result, state if return_state else None)
    if prior_states:
        unknown = set(prior_states) - set(results)
        if unknown:
            raise InvalidInput.single("prior_states", f"states for aliases {sorted(unknown)} match no requested function")
    return Evaluation(results, list(batch.diagnostics), batches, batch, prepared)


def _none_reduction_error(p: Prepared, what: str) -> InvalidInput:
    return InvalidInput.single(
        f"functions[{p.index}].params.reduction",
        f"{p.alias}: reduction='none' returns per-element values, which cannot be {what}; use 'mean' or 'sum'",
    )


class Accumulator:
    """Merges states over many batches (a stream, a run, a rank's shard) with bounded memory."""

    def __init__(
        self,
        functions: Specs,
        *,
        device: torch.device | str = "cpu",
        exact_state_limit: int = DEFAULT_EXACT_STATE_LIMIT,
        budget: Budget | None = None,
        nan_policy: str = DEFAULT_NAN_POLICY,
    ) -> None:
        self.nan_policy = check_nan_policy(nan_policy)
        self.prepared = prepare(functions)
        check_omit(self.prepared, self.nan_policy)
        self.budget = budget  # checked on every batch, before its update
        for p in self.prepared:
            if p.fdef.has_reduction and p.params["reduction"] == "none":
                raise _none_reduction_error(p, "accumulated over a stream")
        self.device = torch.device(device)
        self.exact_state_limit = exact_state_limit
        self.states: dict[str, State] = {}
        self.diagnostics = Diagnostics()
        self.batches = 0
        # Parts of one batch arrive one after another: the last id is all there is to remember
        # (a set of every id would grow with the stream).
        self._last_batch_id = ""
        self._nonfinite_seen = False  # first_nonfinite_batch is said once

    def add(self, tensors: Mapping[str, Any], batch_id: str = "", *, request_id: str = "") -> Batch:
        """Update every function with one batch (or the next part of a batch, when ``batch_id`` repeats).

        ``request_id`` (the stream's) names the batch in first_nonfinite_batch.
        Returns the batch with its memoized intermediates, for subscribers (monitoring)."""
        continuing = bool(batch_id) and batch_id == self._last_batch_id  # a further part of a batch already counted
        if continuing:
            refusing = [p for p in self.prepared if not p.fdef.is_splittable(p.params)]
            if refusing:
                p = refusing[0]
                raise InvalidInput.single(
                    f"functions[{p.index}].name",
                    f"{p.fdef.name} is not splittable (its value depends on the whole batch), but batch {batch_id!r} arrived in several parts; send it whole",
                )
        self._last_batch_id = batch_id
        if self.budget is not None:
            self.budget.check(self.prepared, tensors)
        batch = _batch(self.prepared, tensors, self.device)
        with _diagnostics_on_error(batch):
            # Every update first, then every merge: a batch that fails for one
            # function is merged into none (nothing counted for some functions only).
            batch_of = function_batches(batch, self.prepared, self.nan_policy)
            updates = [(p, _update(p, batch_of[p.index])) for p in self.prepared]
        for p, state in updates:
            self._merge(p, state)
        self.diagnostics.extend(batch.diagnostics)
        if not self._nonfinite_seen:
            found = first_nonfinite(batch.diagnostics, self.batches - (1 if continuing else 0), batch_id, request_id)
            if found is not None:
                self.diagnostics.add("first_nonfinite_batch", found)
                self._nonfinite_seen = True
        self.batches += 0 if continuing else 1
        return batch

    def add_state(self, alias: str, state: State) -> None:
        """Merge a state computed elsewhere (another rank, a file) under ``alias``."""
        self.add_states(alias, [state])

    def add_states(self, alias: str, states: Sequence[State]) -> None:
        """Merge many states under ``alias`` at once: what add_state one by one gives, in linear time."""
        for p in self.prepared:
            if p.alias == alias:
                self._merge(p, *states)
                return
        raise InvalidInput.single(f"states.{alias}", f"no requested function has alias {alias!r}")

    def _merge(self, p: Prepared, *states: State) -> None:
        def check(state: State) -> None:
            if state.function != p.fdef.name or state.params != p.state_params:
                raise InvalidInput.single(
                    f"states.{p.alias}",
                    f"state of {state.function!r} with params {state.params} does not match {p.fdef.name!r} with params {p.state_params}",
                )

        prior = self.states.get(p.alias)
        group = list(states) if prior is None else [prior, *states]  # the prior state passed the check when it merged
        self.states[p.alias] = merge_many(group, p.fdef.fields, concat_limit=self.exact_state_limit, path=f"states.{p.alias}", each=check)

    def result(self, *, return_state: bool = False) -> Evaluation:
        diagnostics = Diagnostics()
        diagnostics.extend(self.diagnostics)
        results = {}
        for p in self.prepared:
            state = self.states.get(p.alias)
            if state is None:
                raise InvalidInput.single("batches", "no batch was received; nothing to finalize")
            result = _result_of(p, state.fields, diagnostics)
            results[p.alias] = _function_result(p, result, state if return_state else None)
        return Evaluation(results, list(diagnostics), self.batches)


def finalize_states(
    states: Iterable[tuple[str, State]], *, exact_state_limit: int = DEFAULT_EXACT_STATE_LIMIT, return_state: bool = False
) -> Evaluation:
    """Merge states from many shards (alias, State) and finalize each alias.

    Functions and parameters come from the states themselves, so a job that
    wrote per-rank states to files needs nothing else to finalize them."""
    groups: dict[str, list[State]] = {}
    for alias, state in states:
        groups.setdefault(alias, []).append(state)
    if not groups:
        raise InvalidInput.single("states", "expected at least one state to finalize, got none")
    specs = []
    for alias, group in groups.items():
        first = group[0]
        params = _params_of_state(first, alias)
        specs.append(FunctionSpec(first.function, params, {}, alias))
    acc = Accumulator(specs, exact_state_limit=exact_state_limit)
    for alias, group in groups.items():
        acc.add_states(alias, group)
    acc.batches = sum(s.batches for s in next(iter(groups.values())))
    return acc.result(return_state=return_state)


def _params_of_state(state: State, alias: str) -> dict[str, Any]:
    try:
        params = json.loads(state.params) if state.params else {}
    except json.JSONDecodeError:
        raise InvalidInput.single(f"states.{alias}.params", f"expected a JSON object, got {state.params!r}") from None
    if not isinstance(params, dict):
        raise InvalidInput.single(f"states.{alias}.params", f"expected a JSON object, got {state.params!r}")
    fdef = get_function(state.function, f"states.{alias}")
    if state.version != fdef.state_version:
        raise InvalidInput.single(
            f"states.{alias}.version", f"this server reads version {fdef.state_version} states of {fdef.name}, got {state.version}"
        )
    return params
