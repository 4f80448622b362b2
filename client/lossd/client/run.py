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
computed in this process by :mod:`lossd.kernels` and merged here with the
server's own merge and finalize code, so ``update`` returns the values over
every batch so far (bit-for-bit the server's for those states) without
waiting for it. Only states travel: a ``Finalize`` of the run's merged
states goes out in the background, at most one in flight and one per
``SEND_INTERVAL``, each covering every batch merged since the last
(:mod:`lossd.client.local_sends` has the rules). ``merge``, ``result``,
``states``, ``named_states`` and ``flush`` send what is held back and wait
for it. A failed send is raised by the next call that waits for it, naming
the first batch N it carried, with the run back to its states before batch
N: resend from batch N. ``batches`` counts batches not sent yet. An
:class:`AsyncRun`'s ``result``, ``states`` and ``named_states`` cannot wait:
while a batch is not acknowledged they raise ``StillSending`` (a
``ValueError``): ``await run.merge()`` first.

A batch refused as bad input raises the same
:class:`~lossd.client.errors.InvalidArgumentError` whether computed here or on
the server, each violation naming the batch (by index, and request id when the
batch had one), as a stream's refusal does.

A run needs only a way to send requests (:class:`Evaluator` or
:class:`AsyncEvaluator`), not a particular client.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from lossd.client import local_sends
from lossd.client.diagnostics import Diagnostic, merge_diagnostics, merge_final_diagnostics
from lossd.client.errors import InvalidArgumentError, naming_batch
from lossd.client.evaluation import EvaluationResult
from lossd.client.local import LocalStates, check_compute, without_states
from lossd.client.local_runs import AsyncEvaluator, Checkpoint, Evaluator, Unsent
from lossd.client.local_sends import EXIT_SECONDS, FailedSend, StillSending, TaskSends, ThreadSends, closing_waits_for
from lossd.client.messages import (
    arrays_of,
    batch_label,
    nan_policy_value,
    new_request_id,
    serialized_evaluate,
    wants_per_element,
    with_nan_policy,
)
from lossd.client.run_results import bounded_response, field_bytes, first_nonfinite, merged_states
from lossd.v1 import lossd_pb2 as pb

if TYPE_CHECKING:
    from lossd.kernels import State

__all__ = ["Evaluator", "AsyncEvaluator", "Run", "AsyncRun", "local_stream", "local_stream_async"]


@contextmanager
def _naming_batch(batch: int, request_id: str) -> Iterator[None]:
    """A bad batch's InvalidArgumentError says which batch of the run it was (the server's for a stream does too)."""
    try:
        yield
    except InvalidArgumentError as exc:
        raise naming_batch(exc, batch_label(batch, request_id=request_id)) from exc


class _RunBook:
    """The bookkeeping shared by :class:`Run` and :class:`AsyncRun` (no I/O); :class:`_RunState` adds compute="local"'s."""

    client: Any  # the subclass's Evaluator or AsyncEvaluator
    _sends: Any  # the subclass's ThreadSends or TaskSends

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
        self._request_id = ""  # of the last update sent, for first_nonfinite_batch
        self._nonfinite_seen = False
        self._local_states: dict[str, State] = {}  # compute="local": the bounded states (as _states), for merging here
        self._checkpoint: Checkpoint | None = None  # compute="local": the run before the first batch of the send in flight
        self._unsent: Unsent | None = None  # compute="local": batches merged here whose Finalize is not sent yet
        self._sent_at = -math.inf  # compute="local": when the last Finalize was sent (time.monotonic)

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
            if alias in exact or (prior is not None and field_bytes(state) > field_bytes(prior)):
                self._states.pop(alias, None)  # a growing state: from now on kept here, never resent
                self._pieces[alias] = [state]
            else:
                self._states[alias] = state
        self._batches += 1
        self._merged = None

    def _add_diagnostics(self, diagnostics: list[Diagnostic], request_id: str) -> None:
        """Count a batch's diagnostics into the run's (first_nonfinite_batch names the first batch that brought NaN or inf)."""
        first = [] if self._nonfinite_seen else first_nonfinite(diagnostics, self._batches, request_id)
        self._nonfinite_seen = self._nonfinite_seen or bool(first)
        self._diagnostics = merge_diagnostics(self._diagnostics + diagnostics + first)

    def _accept(self, result: EvaluationResult) -> EvaluationResult:
        states = result.states()
        missing = [alias for alias in result if alias not in states]
        if missing:
            raise ValueError(
                f"the server returned no state for {missing}: a function with reduction='none' returns per-element values, "
                "which a run cannot accumulate; use reduction='mean' or 'sum'"
            )
        self._add_diagnostics(result.diagnostics, result.response.request_id or self._request_id)
        self._keep(states, set())
        self._last = bounded_response(result.response, self._batches, self._pieces)
        return EvaluationResult(self._last, self._diagnostics)

    # -- merging ---------------------------------------------------------------------------------

    def _finalize_options(self, request_id: str | None = None) -> dict[str, Any]:
        return {"tags": self.tags, "return_state": True, "timeout": self.timeout, "request_id": request_id or self.request_id or None}

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
        """Batches added so far (compute="local": the last one's Finalize may still be in flight)."""
        return self._batches

    @property
    def diagnostics(self) -> list[Diagnostic]:
        """The diagnostics of every update so far (counts added up)."""
        return list(self._diagnostics)

    def _check_started(self) -> None:
        if not self._batches:
            raise ValueError("expected at least one update() before result(), got none")


class _RunState(_RunBook):
    """:class:`_RunBook` with compute="local"'s bookkeeping: batches merged here, the Finalize held back, the checkpoint."""

    def _local_batch(self, tensors: Mapping[str, Any]) -> tuple[dict[str, State], list[Diagnostic]]:
        """compute="local": this batch's states and diagnostics, computed here (bad input raises, naming the batch)."""
        assert self.local is not None
        with _naming_batch(self._batches, self.request_id):
            return self.local.evaluate(tensors)

    def _add_local(self, states: Mapping[str, State], diagnostics: list[Diagnostic]) -> EvaluationResult:
        """compute="local": merge the batch into the run here; its values (its Finalize is the run's ``_unsent`` until sent)."""
        assert self.local is not None
        request_id = self.request_id or new_request_id()
        with _naming_batch(self._batches, request_id):  # what the server would refuse when merging
            merge = self.local.merge(self._local_states, self._states, states, held=set(self._pieces), request_id=request_id)
        if merge.sent:  # the newest Finalize carries the run's states, hence every batch not sent before it
            first = self._unsent or Unsent(Checkpoint.of(self), self._batches, request_id, merge.request)
            self._unsent = Unsent(first.checkpoint, first.batch, request_id, merge.request)
        self._add_diagnostics(diagnostics, self.request_id)
        merged = {r.alias: r.state for r in merge.response.results} if merge.response is not None else {}
        self._keep({**merged, **merge.exact}, set(merge.exact))
        self._local_states = merge.states
        self._last = bounded_response(merge.response or pb.EvaluateResponse(), self._batches, self._pieces)
        return EvaluationResult(self._last, self._diagnostics)

    def _settle(self, failed: FailedSend | None) -> None:
        """After the send in flight ended: nothing more if it succeeded; else back to the run before its first batch, and raise its error."""
        checkpoint, self._checkpoint = self._checkpoint, None
        if failed is None:
            return
        assert checkpoint is not None  # taken when that batch was added
        checkpoint.restore(self)
        self._unsent = None  # batches after the failed send's: dropped with it
        failed.raise_named()

    def _hold(self, busy: bool) -> bool:
        """Whether this update's Finalize waits for a later one: one is in flight, or the last went out under SEND_INTERVAL ago.

        SEND_INTERVAL 0: never; every batch has its Finalize, the next update waiting for the previous one."""
        interval = local_sends.SEND_INTERVAL
        return interval > 0 and (busy or time.monotonic() - self._sent_at < interval)

    def _take_unsent(self) -> Unsent | None:
        """The Finalize to send now (None when every batch was sent); its checkpoint is the one a failure goes back to."""
        unsent, self._unsent = self._unsent, None
        if unsent is not None:
            self._checkpoint = unsent.checkpoint
            self._sent_at = time.monotonic()
        return unsent

    def _send_unsent(self) -> None:
        unsent = self._take_unsent()
        if unsent is not None:
            call = partial(self.client.finalize, unsent.request(), **self._finalize_options(unsent.request_id))
            self._sends.send(unsent.batch, unsent.request_id, call)  # a thread's future, or a task: the subclass's sends


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
        self._sends = ThreadSends()  # compute="local": each update's Finalize, on a worker thread
        if self.local is not None:
            closing_waits_for(client, self, at_exit=True)

    def update(self, tensors: Mapping[str, Any]) -> EvaluationResult:
        """Add one batch; returns the values over every batch so far (exact AUROC/AP: see :meth:`result`).

        compute="local": computed here; the batch's Finalize goes out on a worker thread (see the module docstring)."""
        if self.local is None:
            request = self._request(tensors)
            with _naming_batch(self._batches, self._request_id):
                response = self.client.evaluate_request(request, timeout=self.timeout)
            return self._accept(response)
        states, diagnostics = self._local_batch(tensors)  # while the previous batch's Finalize is on its way
        if self._hold(self._sends.busy):
            return self._add_local(states, diagnostics)  # its Finalize goes with a later batch's
        self._settle(self._sends.wait())
        result = self._add_local(states, diagnostics)
        self._send_unsent()
        return result

    def flush(self) -> None:
        """compute="local": wait until the server has every batch (the Finalize in flight, then the one held back); raises a failed send's error."""
        self._settle(self._sends.wait())
        self._send_unsent()
        self._settle(self._sends.wait())

    def send_held_now(self) -> None:
        """At interpreter exit (the send thread is gone): the Finalize held back, sent from this thread."""
        self._settle(self._sends.wait())
        unsent = self._take_unsent()
        if unsent is not None:  # at most EXIT_SECONDS: a server gone by now must not hold the interpreter's exit
            options = self._finalize_options(unsent.request_id) | {"timeout": min(self.timeout or EXIT_SECONDS, EXIT_SECONDS)}
            self.client.finalize(unsent.request(), **options)

    def merge(self) -> EvaluationResult:
        """Merge every state on the server (one Finalize) and return the values over every batch so far."""
        self.flush()
        self._check_started()
        if not self._pending():
            return self._merged if self._merged is not None else EvaluationResult(self._last or pb.EvaluateResponse(), self._diagnostics)
        return self._take_merge(self.client.finalize(self.named_states(), **self._finalize_options()))

    def result(self) -> EvaluationResult:
        """Return the values over every batch so far (exact functions included), with the diagnostics of all of them."""
        return self.merge()

    def states(self) -> dict[str, pb.State]:
        """Alias -> merged state so far (for Finalize, files, or merging across ranks); merges exact pieces first."""
        self.flush()
        if self._pending():
            self.merge()
        return merged_states(self.functions, self._states, self._pieces)

    def named_states(self) -> list[tuple[str, pb.State]]:
        """Every state of the run as (alias, State) pairs, exact pieces unmerged (Finalize and state files merge them)."""
        self.flush()
        return super().named_states()


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
        self._sends = TaskSends()  # compute="local": each update's Finalize, as a task
        if self.local is not None:
            closing_waits_for(client, self)

    async def update(self, tensors: Mapping[str, Any]) -> EvaluationResult:
        """Add one batch; returns the values over every batch so far (exact AUROC/AP: see :meth:`merge`).

        compute="local": computed here; the batch's Finalize goes out as a task (see the module docstring)."""
        if self.local is None:
            request = self._request(tensors)
            with _naming_batch(self._batches, self._request_id):
                response = await self.client.evaluate_request(request, timeout=self.timeout)
            return self._accept(response)
        states, diagnostics = self._local_batch(tensors)
        if self._hold(self._sends.busy):
            return self._add_local(states, diagnostics)  # its Finalize goes with a later batch's
        self._settle(await self._sends.wait())
        result = self._add_local(states, diagnostics)
        self._send_unsent()
        return result

    async def flush(self) -> None:
        """compute="local": wait until the server has every batch (the Finalize in flight, then the one held back); raises a failed send's error."""
        self._settle(await self._sends.wait())
        self._send_unsent()
        self._settle(await self._sends.wait())

    def _check_sent(self, what: str) -> None:
        """A synchronous read: the server must have every batch already (else StillSending: ``await run.merge()`` first)."""
        self._settle(self._sends.finished(what))
        if self._unsent is not None:
            raise StillSending(
                f"batch {self._unsent.batch}'s Finalize has not been sent yet: await run.merge() before {what} (it sends it and waits)"
            )

    async def merge(self) -> EvaluationResult:
        """Merge every state on the server (one Finalize) and return the values over every batch so far."""
        await self.flush()
        self._check_started()
        if not self._pending():
            return self._merged if self._merged is not None else EvaluationResult(self._last or pb.EvaluateResponse(), self._diagnostics)
        return self._take_merge(await self.client.finalize(self.named_states(), **self._finalize_options()))

    def result(self) -> EvaluationResult:
        """The values over every batch so far; a run with exact AUROC/AP, or a send in flight, needs ``await run.merge()`` first."""
        self._check_sent("run.result()")
        self._check_started()
        if self._pending():
            raise ValueError("this run holds exact AUROC/AP states not merged since the last update: await run.merge() first")
        return self._merged if self._merged is not None else EvaluationResult(self._last or pb.EvaluateResponse(), self._diagnostics)

    def states(self) -> dict[str, pb.State]:
        """Alias -> merged state so far; a run with exact AUROC/AP needs ``await run.merge()`` first (or use named_states())."""
        self._check_sent("run.states()")
        if self._pending():
            raise ValueError("this run holds exact AUROC/AP states in pieces: await run.merge() first, or use named_states()")
        return merged_states(self.functions, self._states, self._pieces)

    def named_states(self) -> list[tuple[str, pb.State]]:
        """Every state of the run as (alias, State) pairs, exact pieces unmerged; a send in flight needs ``await run.merge()`` first."""
        self._check_sent("run.named_states()")
        return super().named_states()


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
