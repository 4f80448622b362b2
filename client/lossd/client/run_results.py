"""What a run's calls return, built from responses and states: pure helpers of :mod:`lossd.client.run` (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lossd.client.diagnostics import Diagnostic
from lossd.client.messages import batch_label
from lossd.v1 import lossd_pb2 as pb

__all__ = ["bounded_response", "field_bytes", "first_nonfinite", "merged_states"]


def field_bytes(state: pb.State) -> int:
    """The bytes of a state's fields: a state whose bytes grow when merged is exact (it keeps every score)."""
    return sum(len(t.data) for t in state.fields.values())


def bounded_response(response: pb.EvaluateResponse, batches: int, exact: Mapping[str, object]) -> pb.EvaluateResponse:
    """The response without the ``exact`` functions' results (they cover part of the batches only)."""
    out = pb.EvaluateResponse(request_id=response.request_id, batches=batches, diagnostics=response.diagnostics)
    out.timing.CopyFrom(response.timing)
    for r in response.results:
        if r.alias not in exact:
            out.results.add().CopyFrom(r)
    return out


def merged_states(
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


def first_nonfinite(diagnostics: Sequence[Diagnostic], batch: int, request_id: str) -> list[Diagnostic]:
    """first_nonfinite_batch for batch ``batch`` (from 0) when its diagnostics report NaN or inf, else none.

    A run reports it once, for the first such batch."""
    for d in diagnostics:
        if d.code in ("nan_or_inf", "rows_omitted"):
            label = batch_label(batch, request_id=request_id)
            return [Diagnostic("first_nonfinite_batch", "warning", f"{label} first brought NaN or infinite values: {d.message}")]
    return []
