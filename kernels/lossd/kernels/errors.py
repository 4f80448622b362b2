"""Input errors raised by lossd.kernels.

Every problem with a request is an :class:`InvalidInput` that carries one or
more *field violations*: the tensor, role or parameter at fault and a message
saying what was expected and what was received.  The gRPC server turns them
into ``INVALID_ARGUMENT`` with ``google.rpc.BadRequest`` details; in-process
callers get an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FieldViolation", "InvalidInput", "StateLimitExceeded"]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: ``field`` is a path such as ``tensors.logits`` or
    ``functions[0].params.n_bins``; ``description`` says expected vs. received."""

    field: str
    description: str


class InvalidInput(ValueError):
    """A request that cannot be evaluated as given."""

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidInput:
        return cls(FieldViolation(field, description))


class StateLimitExceeded(RuntimeError):
    """A bounded state (the exact AUROC score buffer) grew past its limit.

    ``setting`` names the server setting that raises the limit."""

    def __init__(self, message: str, setting: str) -> None:
        self.setting = setting
        super().__init__(message)
