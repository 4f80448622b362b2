"""Diagnostics as Python values, and the one way the client merges them (runs, ranks, files).

A :class:`Diagnostic` is identified by (code, severity, function); merging
keeps one per identity, the latest message, and combines the counts: added
up over the batches of a run or the ranks of a job, or the larger of the two
when a Finalize call reports again what the ranks already counted.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lossd.v1 import lossd_pb2 as pb

__all__ = ["Diagnostic", "DiagnosticTuple", "merge_diagnostics", "merge_final_diagnostics"]

# A diagnostic as plain values, for torch.distributed's object collectives: (code, severity, message, function, count).
DiagnosticTuple = tuple[str, str, str, str, int]


@dataclass(frozen=True)
class Diagnostic:
    """A finding about the inputs (``code`` is stable; see ListFunctions for every code's meaning)."""

    code: str
    severity: str  # info | warning | error
    message: str
    function: str = ""  # alias of the function that raised it; "" for the request
    count: int = 1  # batches that raised it

    @classmethod
    def from_proto(cls, d: pb.Diagnostic) -> Diagnostic:
        """The diagnostic of a response message."""
        severity = pb.Severity.Name(d.severity).lower() if d.severity in pb.Severity.values() else str(d.severity)
        return cls(d.code, severity, d.message, d.function, max(1, d.count))

    def to_proto(self) -> pb.Diagnostic:
        """The response message of this diagnostic."""
        name = self.severity.upper()
        severity = pb.Severity.Value(name) if name in pb.Severity.keys() else pb.SEVERITY_UNSPECIFIED
        return pb.Diagnostic(code=self.code, severity=severity, message=self.message, function=self.function, count=self.count)

    def to_tuple(self) -> DiagnosticTuple:
        """Plain values, for pickling across ranks; ``Diagnostic(*t)`` reads them back."""
        return (self.code, self.severity, self.message, self.function, self.count)


def merge_diagnostics(diagnostics: Iterable[Diagnostic], *, counts: Callable[[int, int], int] = operator.add) -> list[Diagnostic]:
    """One diagnostic per (code, severity, function), in first-seen order, the latest message kept.

    ``counts`` combines the count seen so far with the next one: added up by default.
    """
    merged: dict[tuple[str, str, str], Diagnostic] = {}
    for d in diagnostics:
        key = (d.code, d.severity, d.function)
        prior = merged.get(key)
        merged[key] = d if prior is None else Diagnostic(d.code, d.severity, d.message, d.function, counts(prior.count, d.count))
    return list(merged.values())


def merge_final_diagnostics(ranks: Iterable[Diagnostic], final: Iterable[Diagnostic]) -> list[Diagnostic]:
    """The ranks' diagnostics (counts added up) with those of the Finalize call that merged them.

    A finding both report counts once per batch: the larger count wins.
    """
    return merge_diagnostics([*merge_diagnostics(ranks), *final], counts=max)
