"""Runs: exact totals over many batches, one call per batch, linear in the number of batches.

Two kinds of state, kept differently:

- **Bounded states** (sums, counts, histograms: every state whose size does
  not grow with the data) round-trip: each ``update`` sends the batch with
  the run's merged bounded states (``prior_states``); the server merges and
  returns the new ones, which replace the old ones only when the call
  succeeds. The values ``update`` returns are over every batch so far.
- **Exact states** (exact AUROC/AP keep every score) are never resent. Once a
  state is seen to grow (its fields' bytes increase when merged), the run
  stops sending it as a prior state; each later ``update`` gets back the
  batch's own state, kept client-side as one *piece* (pieces cover disjoint
  batches). ``result()``, ``states()`` or ``merge()`` send all pieces once,
  in one ``Finalize``, which the server merges (and checks against its
  exact-state limit); the merged state then replaces the pieces. So wire
  bytes and time grow linearly with the batches, and the values of exact
  functions are computed only when asked: ``update`` leaves them out of its
  result.

Nothing is lost or counted twice on retries: the server keeps no run state,
a request's prior states are the same on every attempt, and the run changes
(states replaced, a piece appended) only after a successful answer; a failed
update leaves the run as it was, and ``Finalize`` is a pure function of the
states it is sent.

``compute="local"`` (:mod:`lossd.client.local`): each batch's states are
computed in this process by :mod:`lossd.kernels` and only states travel: a
``Finalize`` of the merged bounded states with the batch's (no tensors).

A batch refused as bad input raises the same
:class:`~lossd.client.errors.InvalidArgumentError` whether computed here or on
the server, each violation naming the batch (by index, and request id when the
batch had one), as a stream's refusal does.

A run needs only a way to send requests (:class:`Evaluator` or
:class:`AsyncEvaluator`), not a particular client.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from lossd.client.diagnostics import Diagnostic, merge_diagnostics, merge_final_diagnostics
from lossd.client.errors import InvalidArgumentError, naming_batch
from lossd.client.evaluation import EvaluationResult
from lossd.client.local import LocalStates, check_compute, without_states
from lossd.client.messages import (
    StatesLike,
    TagsLike,
    arrays_of,
    batch_label,
    nan_policy_value,
    new_request_id,
    serialized_evaluate,
    wants_per_element,
    with_nan_policy,
)
from lossd.v1 import lossd_pb2 as pb

__all__ = ["Evaluator", "AsyncEvaluator", "Run", "AsyncRun", "local_stream", "local_stream_async"]


class Evaluator(Protocol):
    """What a :class:`Run` calls: ``Client.evaluate_request`` and ``Client.finalize``."""

    def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult: ...

    def finalize(
        self,
        states: StatesLike,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult: ...


class AsyncEvaluator(Protocol):
    """What an :class:`AsyncRun` awaits: ``AsyncClient.evaluate_request`` and ``AsyncClient.finalize``."""

    async def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult: ...

    async def finalize(
        self,
        states: StatesLike,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult: ...


def _field_bytes(state: pb.State) -> int:
    return sum(len(t.data) for t in state.fields.values())


@contextmanager
def _naming_batch(batch: int, request_id: str) -> Iterator[None]:
    """A bad batch's InvalidArgumentError says which batch of the run it was (the server's for a stream does too)."""
    try:
        yield
    except InvalidArgumentError as exc:
        raise naming_batch(exc, batch_label(batch, request_id=request_id)) from exc


def _bounded(response: pb.EvaluateResponse, batches: int, exact: Mapping[str, object]) -> pb.EvaluateResponse:
    """The response without the ``exact`` functions' results (they cover part of the batches only)."""
    out = pb.EvaluateResponse(request_id=response.request_id, batches=batches, diagnostics=response.diagnostics)
    out.timing.CopyFrom(response.timing)
    for r in response.results:
        if r.alias not in exact:
            out.results.add().CopyFrom(r)
    return out


def _merged_states(
    functions: Sequence[pb.FunctionSpec], states: Mapping[str, pb.State], pieces: Mapping[str, list[pb.State]]
) -> dict[str, pb.State]:
    """Alias -> state in the order of the run's functions (bounded ones, and exact ones merged into one piece)."""
    out: dict[str, pb.State] = {}
    for spec in functions:
        alias = spec.alias or spec.name
        if alias in pieces:
            out[alias] = pieces[alias][0]
        elif alias in states:
            out[alias] = states[alias]
    return out


class _RunState:
    """The bookkeeping shared by :class:`Run` and :class:`AsyncRun` (no I/O)."""

    def __init__(
        self,
        functions: Sequence[pb.FunctionSpec],
        tags: pb.Tags | None,
        timeout: float | None,
        compute: str,
        nan_policy: str | None,
        request_id: str = "",
    ) -> None:
        self.functions = list(functions)
        # A local stream's id (evaluate_stream(compute="local")): its Finalize calls carry it, and it names its batches.
        self.request_id = request_id
        self.nan_policy = nan_policy
        nan_policy_value(nan_policy)  # a bad name fails here, not at the first update
        if wants_per_element(self.functions):
            raise ValueError("reduction='none' returns per-element values, which a run cannot accumulate; use 'mean' or 'sum'")
        self.tags = tags
        self.timeout = timeout
        self.compute = check_compute(compute)
        self.local = LocalStates(self.functions, nan_policy) if self.compute == "local" else None
        self._states: dict[str, pb.State] = {}  # bounded: merged so far, sent with every update
        self._pieces: dict[str, list[pb.State]] = {}  # exact: states of disjoint batches, sent once when merged
        self._last: pb.EvaluateResponse | None = None  # the bounded values over every batch so far
        self._merged: EvaluationResult | None = None  # the last merge, while no update came after it
        self._batches = 0
        self._diagnostics: list[Diagnostic] = []
        self._local_diagnostics: list[Diagnostic] = []  # compute="local": the batch being added
        self._request_id = ""  # of the last update sent, for first_nonfinite_batch
        self._nonfinite_seen = False

    # -- updates ---------------------------------------------------------------------------------

    def _request(self, tensors: Mapping[str, Any]) -> bytes:
        self._request_id = new_request_id()
        payload = serialized_evaluate(
            arrays_of(tensors), self.functions, tags=self.tags, return_state=True, request_id=self._request_id, prior_states=self._states
        )
        return with_nan_policy(payload, self.nan_policy)

    def _keep(self, states: Mapping[str, pb.State], exact: set[str]) -> None:
        """Take a successful update's states: bounded ones replace the run's, exact ones become pieces."""
        for alias, state in states.items():
            if alias in self._pieces:
                self._pieces[alias].append(state)
                continue
            prior = self._states.get(alias)
            if alias in exact or (prior is not None and _field_bytes(state) > _field_bytes(prior)):
                self._states.pop(alias, None)  # a growing state: from now on kept here, never resent
                self._pieces[alias] = [state]
            else:
                self._states[alias] = state
        self._batches += 1
        self._merged = None

    def _accept(self, result: EvaluationResult) -> EvaluationResult:
        states = result.states()
        missing = [alias for alias in result if alias not in states]
        if missing:
            raise ValueError(
                f"the server returned no state for {missing}: a function with reduction='none' returns per-element values, "
                "which a run cannot accumulate; use reduction='mean' or 'sum'"
            )
        first = (
            []
            if self._nonfinite_seen
            else first_nonfinite(result.diagnostics, self._batches, result.response.request_id or self._request_id)
        )
        self._nonfinite_seen = self._nonfinite_seen or bool(first)
        self._diagnostics = merge_diagnostics(self._diagnostics + result.diagnostics + first)
        self._keep(states, set())
        self._last = _bounded(result.response, self._batches, self._pieces)
        return EvaluationResult(self._last, self._diagnostics)

    def _local_batch(self, tensors: Mapping[str, Any]) -> tuple[dict[str, pb.State], list[tuple[str, pb.State]]]:
        """compute="local": this batch's states, and the bounded pairs for the server to merge (the run's, then the batch's)."""
        assert self.local is not None
        with _naming_batch(self._batches, self.request_id):
            states, self._local_diagnostics = self.local.evaluate(tensors)
        pairs: list[tuple[str, pb.State]] = []
        for alias, state in states.items():
            if alias in self.local.exact or alias in self._pieces:
                continue
            if alias in self._states:
                pairs.append((alias, self._states[alias]))
            pairs.append((alias, state))
        return states, pairs

    def _accept_local(self, states: dict[str, pb.State], merged: EvaluationResult | None) -> EvaluationResult:
        """compute="local": the server's merge of the bounded states (None when there are none) and the batch's exact ones."""
        assert self.local is not None
        first = [] if self._nonfinite_seen else first_nonfinite(self._local_diagnostics, self._batches, self.request_id)
        self._nonfinite_seen = self._nonfinite_seen or bool(first)
        self._diagnostics = merge_diagnostics(self._diagnostics + self._local_diagnostics + first)
        exact = {a: s for a, s in states.items() if a in self.local.exact or a in self._pieces}
        self._keep({**(merged.states() if merged is not None else {}), **exact}, self.local.exact)
        self._last = _bounded(merged.response if merged is not None else pb.EvaluateResponse(), self._batches, self._pieces)
        return EvaluationResult(self._last, self._diagnostics)

    # -- merging ---------------------------------------------------------------------------------

    def _finalize_options(self) -> dict[str, Any]:
        return {"tags": self.tags, "return_state": True, "timeout": self.timeout, "request_id": self.request_id or None}

    def _pending(self) -> bool:
        """Whether the values need a merge on the server (exact pieces not merged since the last update)."""
        return bool(self._pieces) and self._merged is None

    def named_states(self) -> list[tuple[str, pb.State]]:
        """Every state of the run as (alias, State) pairs, exact pieces unmerged (Finalize and state files merge them)."""
        return [*self._states.items(), *((alias, piece) for alias, pieces in self._pieces.items() for piece in pieces)]

    def _take_merge(self, result: EvaluationResult) -> EvaluationResult:
        merged = result.states()
        for alias in self._pieces:
            self._pieces[alias] = [merged[alias]]  # one piece: the next merge sends it once more, not the batches
        response = pb.EvaluateResponse()
        response.CopyFrom(result.response)
        response.batches = self._batches
        for r in response.results:
            if r.alias in self._pieces:
                r.ClearField("state")  # held once, as the run's piece (see states())
        self._merged = EvaluationResult(response, merge_final_diagnostics(self._diagnostics, result.diagnostics))
        return self._merged

    @property
    def batches(self) -> int:
        """Batches merged so far."""
        return self._batches

    @property
    def diagnostics(self) -> list[Diagnostic]:
        """The diagnostics of every update so far (counts added up)."""
        return list(self._diagnostics)

    def _check_started(self) -> None:
        if not self._batches:
            raise ValueError("expected at least one update() before result(), got none")


class Run(_RunState):
    """A run on a :class:`~lossd.client.Client`: ``run.update(tensors)`` per batch, then ``run.result()``."""

    def __init__(
        self,
        client: Evaluator,
        functions: Sequence[pb.FunctionSpec],
        *,
        tags: pb.Tags | None = None,
        timeout: float | None = None,
        compute: str = "server",
        nan_policy: str | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(functions, tags, timeout, compute, nan_policy, request_id)
        self.client = client

    def update(self, tensors: Mapping[str, Any]) -> EvaluationResult:
        """Add one batch; returns the values over every batch so far (exact AUROC/AP: see :meth:`result`)."""
        if self.local is None:
            request = self._request(tensors)
            with _naming_batch(self._batches, self._request_id):
                response = self.client.evaluate_request(request, timeout=self.timeout)
            return self._accept(response)
        states, bounded = self._local_batch(tensors)
        merged = self.client.finalize(bounded, **self._finalize_options()) if bounded else None
        return self._accept_local(states, merged)

    def merge(self) -> EvaluationResult:
        """Merge every state on the server (one Finalize) and return the values over every batch so far."""
        self._check_started()
        if not self._pending():
            return self._merged if self._merged is not None else EvaluationResult(self._last or pb.EvaluateResponse(), self._diagnostics)
        return self._take_merge(self.client.finalize(self.named_states(), **self._finalize_options()))

    def result(self) -> EvaluationResult:
        """Return the values over every batch so far (exact functions included), with the diagnostics of all of them."""
        return self.merge()

    def states(self) -> dict[str, pb.State]:
        """Alias -> merged state so far (for Finalize, files, or merging across ranks); merges exact pieces first."""
        if self._pending():
            self.merge()
        return _merged_states(self.functions, self._states, self._pieces)


class AsyncRun(_RunState):
    """A run on an :class:`~lossd.client.AsyncClient`: ``await run.update(tensors)`` per batch, ``await run.merge()``."""

    def __init__(
        self,
        client: AsyncEvaluator,
        functions: Sequence[pb.FunctionSpec],
        *,
        tags: pb.Tags | None = None,
        timeout: float | None = None,
        compute: str = "server",
        nan_policy: str | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(functions, tags, timeout, compute, nan_policy, request_id)
        self.client = client

    async def update(self, tensors: Mapping[str, Any]) -> EvaluationResult:
        """Add one batch; returns the values over every batch so far (exact AUROC/AP: see :meth:`merge`)."""
        if self.local is None:
            request = self._request(tensors)
            with _naming_batch(self._batches, self._request_id):
                response = await self.client.evaluate_request(request, timeout=self.timeout)
            return self._accept(response)
        states, bounded = self._local_batch(tensors)
        merged = await self.client.finalize(bounded, **self._finalize_options()) if bounded else None
        return self._accept_local(states, merged)

    async def merge(self) -> EvaluationResult:
        """Merge every state on the server (one Finalize) and return the values over every batch so far."""
        self._check_started()
        if not self._pending():
            return self._merged if self._merged is not None else EvaluationResult(self._last or pb.EvaluateResponse(), self._diagnostics)
        return self._take_merge(await self.client.finalize(self.named_states(), **self._finalize_options()))

    def result(self) -> EvaluationResult:
        """The values over every batch so far; a run with exact AUROC/AP needs ``await run.merge()`` first."""
        self._check_started()
        if self._pending():
            raise ValueError("this run holds exact AUROC/AP states not merged since the last update: await run.merge() first")
        return self._merged if self._merged is not None else EvaluationResult(self._last or pb.EvaluateResponse(), self._diagnostics)

    def states(self) -> dict[str, pb.State]:
        """Alias -> merged state so far; a run with exact AUROC/AP needs ``await run.merge()`` first (or use named_states())."""
        if self._pending():
            raise ValueError("this run holds exact AUROC/AP states in pieces: await run.merge() first, or use named_states()")
        return _merged_states(self.functions, self._states, self._pieces)


def local_stream(run: Run, batches: Iterable[Mapping[str, Any]], *, return_state: bool) -> EvaluationResult:
    """``evaluate_stream(..., compute="local")``: ``run`` (a local run, with the stream's nan_policy) over the batches, merged once."""
    for batch in batches:
        run.update(batch)
    result = run.merge()
    return result if return_state else without_states(result)


async def local_stream_async(
    run: AsyncRun, batches: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]], *, return_state: bool
) -> EvaluationResult:
    """The asyncio twin of :func:`local_stream` (``batches`` may be an async iterable)."""
    if isinstance(batches, AsyncIterable):
        async for batch in batches:
            await run.update(batch)
    else:
        for batch in batches:
            await run.update(batch)
    result = await run.merge()
    return result if return_state else without_states(result)


def first_nonfinite(diagnostics: Sequence[Diagnostic], batch: int, request_id: str) -> list[Diagnostic]:
    """first_nonfinite_batch for batch ``batch`` (from 0) when its diagnostics report NaN or inf, else none.

    A run reports it once, for the first such batch."""
    for d in diagnostics:
        if d.code in ("nan_or_inf", "rows_omitted"):
            label = batch_label(batch, request_id=request_id)
            return [Diagnostic("first_nonfinite_batch", "warning", f"{label} first brought NaN or infinite values: {d.message}")]
    return []
