"""What the client commands print: the one error printer and the table of results."""

from __future__ import annotations

import sys
from typing import TextIO

from lossd.client.cli.common import EXIT_FAILURE, EXIT_INVALID
from lossd.client.errors import InvalidArgumentError, LossdError
from lossd.client.evaluation import EvaluationResult

__all__ = ["fail", "fail_call", "print_results"]


def fail(command: str, message: str, code: int, err: TextIO | None = None) -> int:
    """Print ``lossd COMMAND: MESSAGE`` to stderr and return the exit code ``code``."""
    print(f"lossd {command}: {message}", file=err or sys.stderr)
    return code


def fail_call(command: str, exc: LossdError, err: TextIO | None = None) -> int:
    """Print a failed call with the server's field violations; exit 2 on INVALID_ARGUMENT, 1 otherwise."""
    violations = getattr(exc, "violations", [])
    lines = [str(exc), *(f"  {v.field}: {v.description}" for v in violations)]
    return fail(command, "\n".join(lines), EXIT_INVALID if isinstance(exc, InvalidArgumentError) else EXIT_FAILURE, err)


def _number(x: float) -> str:
    return f"{x:.8g}"


def print_results(result: EvaluationResult, out: TextIO) -> None:
    """Print the values as a table (function, value, denominator), then the diagnostics."""
    rows: list[tuple[str, str, str]] = []
    for alias, r in result.items():
        denominator = f"{_number(r.denominator)} {r.denominator_kind}".strip() if r.denominator is not None else ""
        names = sorted(r.values, key=lambda k: (k != "value", k))
        for name in names:
            rows.append((alias if name == "value" else f"{alias}.{name}", _number(r.values[name]), denominator if name == "value" else ""))
        for name, t in sorted(r.tensors.items()):
            label = alias if name == "value" else f"{alias}.{name}"
            rows.append((label, f"tensor {list(t.shape)} (see --json)", denominator if name == "value" and not names else ""))
    header = ("function", "value", "denominator")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    if result.diagnostics:
        print("\ndiagnostics:", file=out)
        for d in result.diagnostics:
            where = f" [{d.function}]" if d.function else ""
            count = f" (x{d.count})" if d.count > 1 else ""
            print(f"  {d.severity}: {d.code}{where}{count}: {d.message}", file=out)
