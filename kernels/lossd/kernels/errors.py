"""Input errors raised by lossd.kernels.

Every problem with a request is an :class:`InvalidInput` that carries one or
more *field violations*: the tensor, role or parameter at fault and a message
saying what was expected and what was received.  The gRPC server turns them
into ``INVALID_ARGUMENT`` with ``google.rpc.BadRequest`` details; in-process
callers get an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations

from dataclasses import dataclass

from lossd.kernels.diagnostics import Diagnostic

__all__ = ["FieldViolation", "InvalidInput", "StateLimitExceeded", "RequestBudgetExceeded"]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request.

    ``field`` is a path such as ``tensors.logits`` or ``functions[0].params.n_bins``;
    ``description`` says what was expected and what was received."""

    field: str
    description: str


class InvalidInput(ValueError):
    """A request that cannot be evaluated as given."""

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        # Findings made before the request failed, set by evaluate(): labels_out_of_range
        # is both an error and a diagnostic, and a NaN found earlier still matters.
        self.diagnostics: list[Diagnostic] = []
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidInput:
        return cls(FieldViolation(field, description))


class StateLimitExceeded(RuntimeError):
    """A bounded state (the exact AUROC score buffer) grew past its limit.

    ``setting`` names the server setting that raises the limit; ``reason`` is
    the google.rpc.ErrorInfo reason; ``retry_after`` (seconds) is set only
    where the same request may succeed later (an overloaded server)."""

    reason = "STATE_LIMIT_EXCEEDED"
    retry_after: float | None = None

    def __init__(self, message: str, setting: str) -> None:
        self.setting = setting
        super().__init__(message)


class RequestBudgetExceeded(StateLimitExceeded):
    """A request whose estimated memory (intermediates, states, response) is over the server's budget.

    Refused before anything is allocated; retrying it elsewhere would fail the same way."""

    reason = "REQUEST_BUDGET_EXCEEDED"
