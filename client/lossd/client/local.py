"""``compute="local"``: a batch's states computed in this process with :mod:`lossd.kernels`.

A run with ``compute="local"`` never sends tensors: each batch is evaluated
here by the same kernels the server runs (so the states are bit-for-bit the
server's), and only the states travel, in a ``Finalize`` call that the server
merges and finalizes (:mod:`lossd.client.run`). For [B, T, 128k] logits this
is the only practical way to evaluate remotely: the wire carries bytes of the
order of the state, not of the logits.

Bad input raises what the server answers for the same batch: an
:class:`~lossd.client.errors.InvalidArgumentError` with the same field
violations (and the diagnostics found before the error, as status details).

torch and the kernels stay optional for the client: they are imported when a
local run is created, and their absence is a clear ``ImportError`` saying
what to install.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, json_format

from lossd.client.codec import encode_tensor
from lossd.client.diagnostics import Diagnostic
from lossd.client.errors import InvalidArgumentError, invalid_argument
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import arrays_of
from lossd.v1 import lossd_pb2 as pb

if TYPE_CHECKING:
    from lossd.kernels import InvalidInput, State

__all__ = ["COMPUTE_MODES", "LocalStates", "check_compute", "without_states"]

COMPUTE_MODES = ("server", "local")
_SEVERITY = {"info": pb.INFO, "warning": pb.WARNING, "error": pb.ERROR}
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
        # Aliases whose state holds every score (CONCAT fields: exact AUROC/AP): kept client-side until merged.
        self.exact: set[str] = set()
        for spec in self.specs:
            fdef = kernels.get_function(spec.name, "functions")
            if any(op is kernels.MergeOp.CONCAT for op in fdef.fields.values()):
                self.exact.add(spec.alias or spec.name)

    def evaluate(self, tensors: Mapping[str, Any]) -> tuple[dict[str, pb.State], list[Diagnostic]]:
        """The states of one batch (alias -> State) and its diagnostics; bad input raises ``InvalidArgumentError`` (a ValueError)."""
        arrays = arrays_of(tensors)
        try:
            torch_tensors = {name: self._kernels.to_torch(array, name) for name, array in arrays.items()}
            # No limit here: the server applies its exact-state limit when it merges the run's states.
            evaluation = self._kernels.evaluate(
                torch_tensors, self.specs, return_state=True, exact_state_limit=2**62, nan_policy=self.nan_policy
            )
        except self._kernels.InvalidInput as exc:
            raise as_invalid_argument(exc) from exc
        states: dict[str, pb.State] = {}
        for alias, result in evaluation.results.items():
            if result.state is None:
                raise ValueError(
                    f"{alias}: reduction='none' returns per-element values, which a run cannot accumulate; use 'mean' or 'sum'"
                )
            states[alias] = state_to_proto(result.state)
        diagnostics = [Diagnostic(d.code, d.severity, d.message, d.function, d.count) for d in evaluation.diagnostics]
        return states, diagnostics


def as_invalid_argument(exc: InvalidInput) -> InvalidArgumentError:
    """The server's answer to a batch that raised ``exc`` (lossd.server.errors.status_for), as this client raises it."""
    details = []
    for d in exc.diagnostics:
        packed = any_pb2.Any()
        packed.Pack(pb.Diagnostic(code=d.code, severity=_SEVERITY[d.severity], message=d.message, function=d.function, count=d.count))
        details.append(packed)
    return invalid_argument([(v.field, v.description) for v in exc.violations], details)
