"""Runs: exact totals over many batches, one ``Evaluate`` call per batch.

Each ``update`` sends the batch with the run's merged states so far
(``prior_states``); the server merges and returns the new states, which
replace the old ones only when the call succeeds. So the client holds one
state per function (memory bounded however many batches), and a failed or
retried call never counts a batch twice.

A run needs only a way to send one request (:class:`Evaluator` or
:class:`AsyncEvaluator`), not a particular client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from lossd.client.diagnostics import Diagnostic, merge_diagnostics
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import arrays_of, new_request_id, serialized_evaluate, wants_per_element
from lossd.v1 import lossd_pb2 as pb

__all__ = ["Evaluator", "AsyncEvaluator", "Run", "AsyncRun"]


class Evaluator(Protocol):
    """What a :class:`Run` calls: ``Client.evaluate_request``."""

    def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult: ...


class AsyncEvaluator(Protocol):
    """What an :class:`AsyncRun` awaits: ``AsyncClient.evaluate_request``."""

    async def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult: ...


class _RunState:
    """The bookkeeping shared by :class:`Run` and :class:`AsyncRun`."""

    def __init__(self, functions: Sequence[pb.FunctionSpec], tags: pb.Tags | None, timeout: float | None) -> None:
        self.functions = list(functions)
        if wants_per_element(self.functions):
            raise ValueError("reduction='none' returns per-element values, which a run cannot accumulate; use 'mean' or 'sum'")
        self.tags = tags
        self.timeout = timeout
        self._states: dict[str, pb.State] = {}
        self._last: pb.EvaluateResponse | None = None
        self._diagnostics: list[Diagnostic] = []

    def _request(self, tensors: Mapping[str, Any]) -> bytes:
        return serialized_evaluate(
            arrays_of(tensors), self.functions, tags=self.tags, return_state=True, request_id=new_request_id(), prior_states=self._states
        )

    def _accept(self, result: EvaluationResult) -> EvaluationResult:
        states = result.states()
        missing = [alias for alias in result if alias not in states]
        if missing:
            raise ValueError(
                f"the server returned no state for {missing}: a function with reduction='none' returns per-element values, "
                "which a run cannot accumulate; use reduction='mean' or 'sum'"
            )
        self._states = states
        self._last = result.response
        self._diagnostics = merge_diagnostics(self._diagnostics + result.diagnostics)
        return self.result()

    @property
    def batches(self) -> int:
        """Batches merged so far."""
        return self._last.batches if self._last is not None else 0

    def states(self) -> dict[str, pb.State]:
        """Alias -> merged state so far (for Finalize, files, or merging across ranks)."""
        return dict(self._states)

    def result(self) -> EvaluationResult:
        """Return the values over every batch so far, with the diagnostics of all of them."""
        if self._last is None:
            raise ValueError("expected at least one update() before result(), got none")
        return EvaluationResult(self._last, self._diagnostics)


class Run(_RunState):
    """A run on a :class:`~lossd.client.Client`: ``run.update(tensors)`` per batch, then ``run.result()``."""

    def __init__(
        self, client: Evaluator, functions: Sequence[pb.FunctionSpec], *, tags: pb.Tags | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(functions, tags, timeout)
        self.client = client

    def update(self, tensors: Mapping[str, Any]) -> EvaluationResult:
        """Add one batch; returns the values over every batch so far."""
        return self._accept(self.client.evaluate_request(self._request(tensors), timeout=self.timeout))


class AsyncRun(_RunState):
    """A run on an :class:`~lossd.client.AsyncClient`: ``await run.update(tensors)`` per batch."""

    def __init__(
        self, client: AsyncEvaluator, functions: Sequence[pb.FunctionSpec], *, tags: pb.Tags | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(functions, tags, timeout)
        self.client = client

    async def update(self, tensors: Mapping[str, Any]) -> EvaluationResult:
        """Add one batch; returns the values over every batch so far."""
        return self._accept(await self.client.evaluate_request(self._request(tensors), timeout=self.timeout))
