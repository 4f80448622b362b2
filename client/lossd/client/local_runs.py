"""The bookkeeping of :mod:`lossd.client.run` apart from its calls: what a run sends with, and where a local run goes back to.

:class:`Evaluator` and :class:`AsyncEvaluator` are what a run needs of a
client. :class:`Checkpoint` is a ``compute="local"`` run as it was before the
first batch of a send (a failed send puts it back), :class:`Unsent` the
batches merged here whose ``Finalize`` has not gone out yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from lossd.client.diagnostics import Diagnostic
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import StatesLike, TagsLike
from lossd.v1 import lossd_pb2 as pb

if TYPE_CHECKING:
    from lossd.kernels import State

__all__ = ["Evaluator", "AsyncEvaluator", "Checkpoint", "Unsent"]


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


@dataclass(frozen=True)
class Unsent:
    """Batches merged here whose Finalize has not gone out: the newest one's ``request`` carries them all."""

    checkpoint: Checkpoint  # the run before the first of them: where a failed send goes back to
    batch: int  # the first of them (from 0), which a failure names
    request_id: str  # of the newest, which its Finalize carries
    request: Callable[[], list[tuple[str, pb.State]]]  # its Finalize's states, encoded when it is sent


@dataclass(frozen=True)
class Checkpoint:
    """A local run just before its latest batch was added: where a failed send of that batch takes it back."""

    states: dict[str, pb.State]
    local_states: dict[str, State]
    pieces: dict[str, int]  # alias -> how many pieces it had (pieces only grow until a merge, which waits for the send)
    batches: int
    diagnostics: list[Diagnostic]
    nonfinite_seen: bool
    last: pb.EvaluateResponse | None
    merged: EvaluationResult | None

    @classmethod
    def of(cls, run: Any) -> Checkpoint:
        """The run as it is (its dicts copied: adding a batch changes them in place; the rest is replaced, never changed)."""
        pieces = {alias: len(held) for alias, held in run._pieces.items()}
        return cls(
            dict(run._states), run._local_states, pieces, run._batches, run._diagnostics, run._nonfinite_seen, run._last, run._merged
        )

    def restore(self, run: Any) -> None:
        """Put ``run`` back as it was (a batch added since is dropped, its exact pieces included)."""
        run._states = dict(self.states)
        run._local_states = self.local_states
        run._pieces = {alias: run._pieces[alias][:count] for alias, count in self.pieces.items()}
        run._batches, run._diagnostics, run._nonfinite_seen = self.batches, self.diagnostics, self.nonfinite_seen
        run._last, run._merged = self.last, self.merged
