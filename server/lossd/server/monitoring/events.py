"""The monitoring contract: the event the servicer emits per evaluation, and its subscribers.

The servicer decodes, validates, calls :mod:`lossd.kernels` and encodes; after
each evaluation it hands one :class:`EvaluationEvent` to every subscriber and
knows nothing of what they do with it. An event carries what the evaluation
already computed (the batch with its memoized row statistics, the prepared
specs with their role mappings), so that subscribers never compute it again.

A stream produces one event per message (``evaluation`` None, ``batch`` set),
then one with the stream's result, or, when the stream fails, one with
``aborted`` set: subscribers that sum messages export them only on success.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lossd.kernels import Evaluation, State
from lossd.kernels.batch import Batch
from lossd.kernels.prepared import Prepared
from lossd.v1 import lossd_pb2 as pb

__all__ = ["EvaluationEvent", "Method", "Subscriber"]

Method = Literal["Evaluate", "EvaluateStream", "Finalize"]


@dataclass(frozen=True)
class EvaluationEvent:
    """One evaluation as the servicer saw it (see the module docstring for a stream's events)."""

    method: Method
    call: int  # unique per RPC in this process: a stream's events share it
    tags: pb.Tags
    # The call's finished evaluation; None for a stream message and for an aborted stream.
    evaluation: Evaluation | None
    # The batch this event evaluated, with its memoized row statistics (Evaluate, a stream
    # message); None for Finalize and for a stream's closing event.
    batch: Batch | None = None
    # The request's functions: fdef, resolved params, role -> tensor mapping, alias (empty for Finalize).
    prepared: tuple[Prepared, ...] = ()
    # Evaluate's prior_states (alias -> State): the evaluation includes them, so a
    # subscriber counting this batch's contribution subtracts them.
    prior_states: Mapping[str, State] = field(default_factory=dict)
    aborted: bool = False  # the stream failed: forget its messages
    # Seconds spent per phase of the RPC (queue, decode, compute, encode; a stream's summed over
    # its messages), on the event that carries the call's evaluation.
    phases: Mapping[str, float] = field(default_factory=dict)

    @property
    def is_stream_message(self) -> bool:
        """A stream message's event: a batch without the stream's result."""
        return self.evaluation is None and not self.aborted


class Subscriber(Protocol):
    """Receives every event on the event loop: it must return at once (queue heavy work) and never raise."""

    def __call__(self, event: EvaluationEvent) -> None: ...
