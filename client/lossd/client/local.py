"""``compute="local"``: a batch's states computed in this process with :mod:`lossd.kernels`.

A run with ``compute="local"`` never sends tensors: each batch is evaluated
here by the same kernels the server runs (so the states are bit-for-bit the
server's), and only the states travel, in a ``Finalize`` call that the server
merges and finalizes (:mod:`lossd.client.run`). For [B, T, 128k] logits this
is the only practical way to evaluate remotely: the wire carries bytes of the
order of the state, not of the logits.

The run's values need no answer from the server: :meth:`LocalStates.merge`
merges the batch's bounded states into the run's with the server's own code
(``lossd.kernels.finalize_states``) and encodes the response the server's
``Finalize`` gives for those states (:func:`evaluation_to_response`), so the
run can send that ``Finalize`` in the background.

Bad input raises what the server answers for the same batch: an
:class:`~lossd.client.errors.InvalidArgumentError` with the same field
violations (and the diagnostics found before the error, as status details).

torch and the kernels stay optional for the client: they are imported when a
local run is created, and their absence is a clear ``ImportError`` saying
what to install.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import any_pb2, json_format

from lossd.client.codec import encode_tensor
from lossd.client.diagnostics import Diagnostic
from lossd.client.errors import InvalidArgumentError, invalid_argument
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import arrays_of
from lossd.v1 import lossd_pb2 as pb

if TYPE_CHECKING:
    from lossd.kernels import Evaluation, InvalidInput, State
    from lossd.kernels.diagnostics import Diagnostic as KernelDiagnostic

__all__ = [
    "COMPUTE_MODES",
    "LocalMerge",
    "LocalStates",
    "check_compute",
    "diagnostic_to_proto",
    "evaluation_to_response",
    "state_to_proto",
    "without_states",
]

COMPUTE_MODES = ("server", "local")
SEVERITY = {"info": pb.INFO, "warning": pb.WARNING, "error": pb.ERROR}  # a kernel diagnostic's severity on the wire
# No limit on exact (CONCAT) states here: the server applies its own when it merges the run's states.
_NO_LIMIT = 2**62
INSTALL_HINT = (
    "compute='local' computes states in this process with lossd.kernels (and torch), which are not installed: pip install lossd-kernels"
)


def check_compute(compute: str) -> str:
    """``compute`` checked: "server" (tensors go to the server) or "local" (only states do)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"expected compute to be one of {', '.join(map(repr, COMPUTE_MODES))}, got {compute!r}")
    return compute


def without_states(result: EvaluationResult) -> EvaluationResult:
    """``result`` without its states (a call that did not ask for them gets none)."""
    response = pb.EvaluateResponse()
    response.CopyFrom(result.response)
    for r in response.results:
        r.ClearField("state")
    return EvaluationResult(response, result.diagnostics)


def state_to_proto(state: State) -> pb.State:
    """A kernel state as the wire's ``State`` (what the server returns for the same batch)."""
    return pb.State(
        function=state.function,
        version=state.version,
        params_json=state.params,
        fields={k: encode_tensor(v, k) for k, v in state.to_arrays().items()},
        batches=state.batches,
    )


class LocalStates:
    """Evaluates the run's functions on one batch in this process; returns per-alias states and diagnostics."""

    def __init__(self, functions: Sequence[pb.FunctionSpec], nan_policy: str | None = None) -> None:
        self.nan_policy = nan_policy or "propagate"
        try:
            import lossd.kernels as kernels
        except ImportError as exc:  # torch or the kernels missing
            raise ImportError(INSTALL_HINT) from exc
        self._kernels = kernels
        # The server converts the wire's specs the same way (a Struct's numbers are floats on both sides).
        self.specs = [
            kernels.FunctionSpec(f.name, json_format.MessageToDict(f.params) if f.HasField("params") else {}, dict(f.inputs), f.alias)
            for f in functions
        ]
        # Alias -> its CONCAT fields (AUROC/AP): a state holding scores there (exact, bins=None) is kept
        # client-side until merged; a binned one holds none there, and merges like any bounded state.
        self._concat: dict[str, list[str]] = {}
        for spec in self.specs:
            fdef = kernels.get_function(spec.name, "functions")
            concat = [name for name, op in fdef.fields.items() if op is kernels.MergeOp.CONCAT]
            if concat:
                self._concat[spec.alias or spec.name] = concat

    def evaluate(self, tensors: Mapping[str, Any]) -> tuple[dict[str, State], list[Diagnostic]]:
        """The states of one batch (alias -> State) and its diagnostics; bad input raises ``InvalidArgumentError`` (a ValueError).

        The batch is finalized alone too (a few microseconds for a [256, 32000] batch): the
        diagnostics of that finalize (an all-ignored batch, say) are the batch's own."""
        arrays = arrays_of(tensors)
        try:
            torch_tensors = {name: self._kernels.to_torch(array, name) for name, array in arrays.items()}
            evaluation = self._kernels.evaluate(
                torch_tensors, self.specs, return_state=True, exact_state_limit=_NO_LIMIT, nan_policy=self.nan_policy
            )
        except self._kernels.InvalidInput as exc:
            raise as_invalid_argument(exc) from exc
        states: dict[str, State] = {}
        for alias, result in evaluation.results.items():
            if result.state is None:
                raise ValueError(
                    f"{alias}: reduction='none' returns per-element values, which a run cannot accumulate; use 'mean' or 'sum'"
                )
            states[alias] = result.state
        diagnostics = [Diagnostic(d.code, d.severity, d.message, d.function, d.count) for d in evaluation.diagnostics]
        return states, diagnostics

    def merge(
        self,
        prior: Mapping[str, State],
        prior_protos: Mapping[str, pb.State],
        batch: Mapping[str, State],
        *,
        held: Container[str],
        request_id: str,
    ) -> LocalMerge:
        """One batch merged into the run here, as the server's ``Finalize`` of the same states merges it.

        ``prior`` are the run's merged bounded states (``prior_protos``: the same, encoded),
        ``batch`` the batch's states, ``held`` the aliases whose states the run keeps as pieces
        (exact AUROC/AP). Those, and a first state holding scores (exact from the start), are
        not merged here: they are the merge's ``exact`` states. (A bounded state that starts to
        hold scores grows when merged, and the run then keeps it as a piece, as any run does.)
        A merge the server would refuse raises its ``InvalidArgumentError``."""
        exact_aliases = {
            alias for alias, state in batch.items() if alias in held or (alias not in prior and self._holds_scores(alias, state))
        }
        bounded = [alias for alias in batch if alias not in exact_aliases]
        exact = {alias: state_to_proto(batch[alias]) for alias in batch if alias in exact_aliases}
        if not bounded:
            return LocalMerge(None, {}, exact, [])
        # The Finalize's order (the run's state, then the batch's) is the order finalize_states merges in.
        pairs = [(alias, state) for alias in bounded for state in ([prior[alias]] if alias in prior else []) + [batch[alias]]]
        sent: list[tuple[str, pb.State | State]] = [
            (alias, state) for alias in bounded for state in ([prior_protos[alias]] if alias in prior else []) + [batch[alias]]
        ]
        try:
            evaluation = self._kernels.finalize_states(pairs, exact_state_limit=_NO_LIMIT, return_state=True)
        except self._kernels.InvalidInput as exc:
            raise as_invalid_argument(exc) from exc
        merged = {alias: r.state for alias, r in evaluation.results.items() if r.state is not None}
        return LocalMerge(evaluation_to_response(evaluation, request_id), merged, exact, sent)

    def _holds_scores(self, alias: str, state: State) -> bool:
        return any(state.fields[name].ndim and state.fields[name].shape[0] for name in self._concat.get(alias, ()))


@dataclass(frozen=True)
class LocalMerge:
    """A batch merged into a local run: the values over every batch so far, and the ``Finalize`` that tells the server."""

    # What the server's Finalize of ``request`` answers (bounded functions, with their merged
    # states); None when every function is exact (nothing to merge, nothing to send).
    response: pb.EvaluateResponse | None
    states: dict[str, State]  # the run's merged bounded states, for the next batch's merge
    exact: dict[str, pb.State]  # the batch's exact states: kept by the run as pieces, never in the Finalize
    # The Finalize's states: per alias the run's prior state (encoded already), then the batch's (encoded by request()).
    sent: list[tuple[str, pb.State | State]]

    def request(self) -> list[tuple[str, pb.State]]:
        """The Finalize's states, the batch's encoded now: a merge whose Finalize a later one's supersedes is never encoded."""
        return [(alias, state if isinstance(state, pb.State) else state_to_proto(state)) for alias, state in self.sent]


def evaluation_to_response(evaluation: Evaluation, request_id: str = "") -> pb.EvaluateResponse:
    """The ``EvaluateResponse`` of ``evaluation``: what the server answers (lossd.server.convert.evaluation_to_proto is this function)."""
    results = []
    for r in evaluation.results.values():
        message = pb.FunctionResult(
            alias=r.alias,
            function=r.function,
            values=r.values,
            tensors={k: encode_tensor(np.asarray(v, dtype=np.float64), k) for k, v in r.tensors.items()},
            denominator_kind=r.denominator_kind,
        )
        if r.denominator is not None:
            message.denominator = r.denominator
        if r.state is not None:
            message.state.CopyFrom(state_to_proto(r.state))
        results.append(message)
    diagnostics = [diagnostic_to_proto(d) for d in evaluation.diagnostics]
    return pb.EvaluateResponse(results=results, diagnostics=diagnostics, request_id=request_id, batches=evaluation.batches)


def diagnostic_to_proto(d: KernelDiagnostic) -> pb.Diagnostic:
    """A kernel diagnostic as the wire's ``Diagnostic`` (the server's responses and error details use this too)."""
    return pb.Diagnostic(code=d.code, severity=SEVERITY[d.severity], message=d.message, function=d.function, count=d.count)


def as_invalid_argument(exc: InvalidInput) -> InvalidArgumentError:
    """The server's answer to a batch that raised ``exc`` (lossd.server.errors.status_for), as this client raises it."""
    details = []
    for d in exc.diagnostics:
        packed = any_pb2.Any()
        packed.Pack(diagnostic_to_proto(d))
        details.append(packed)
    return invalid_argument([(v.field, v.description) for v in exc.violations], details)
