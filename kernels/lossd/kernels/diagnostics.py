"""Diagnostics: findings about the inputs that are not errors but must be seen.

Every response carries the diagnostics its evaluation raised; nothing is fixed
up silently.  The codes are part of the API (CATALOGUE.md, "Diagnostics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["Diagnostic", "Diagnostics", "CODES", "INFO", "WARNING", "ERROR"]

INFO, WARNING, ERROR = "info", "warning", "error"

# code -> (default severity, what it means). ListFunctions and the README show this table.
CODES: dict[str, tuple[str, str]] = {
    "probabilities_as_logits": (
        WARNING,
        "scores read as logits look like probabilities (rows in [0, 1] summing to 1); pass input_kind=probs if they are",
    ),
    "log_probs_as_logits": (
        WARNING,
        "scores read as logits look like log-probabilities (rows <= 0 whose exp sums to 1); pass input_kind=log_probs if they are",
    ),
    "nan_or_inf": (ERROR, "a tensor holds NaN or infinite values; the affected results are NaN or inf"),
    "rows_omitted": (
        WARNING,
        "nan_policy=omit dropped rows holding NaN or infinite values from the numerator and the denominator; the message counts them",
    ),
    "first_nonfinite_batch": (
        WARNING,
        "the first batch of a stream or run that brought NaN or infinite values (its index from 0 and its request id)",
    ),
    "labels_out_of_range": (ERROR, "labels outside [0, K) that are not ignore_index"),
    "all_ignored": (WARNING, "every element was ignored or had zero weight; the value is NaN with denominator 0"),
    "ignored_fraction": (INFO, "a large share of elements equals ignore_index"),
    "multi_label_targets_with_softmax": (
        WARNING,
        "rows of target_probs hold several ones: multi-label targets under a softmax loss; use bce_with_logits",
    ),
    "class_imbalance": (INFO, "the minority class holds less than 1% of the labels"),
    "ctc_infeasible": (WARNING, "CTC samples whose input is too short for their target (with repeats); their loss is infinite"),
    "single_class_auroc": (WARNING, "only one class is present; AUROC and average precision are undefined (NaN)"),
    "extreme_temperature": (WARNING, "contrastive logits (similarity / temperature) exceed 1e3 in magnitude; softmax saturates"),
    "precision_loss": (WARNING, "a float16 input holds values at or beyond float16's range (|x| >= 65504) or infinities from overflow"),
    "empty_sequences": (INFO, "sequences with no valid token were skipped in sequence normalization"),
    "overflow": (WARNING, "a loss term overflowed to inf in float64 (reported as inf, not clipped)"),
    "no_valid_pair": (
        WARNING,
        "metric-learning batches with no valid pair (a single embedding, every label equal or every label distinct): each "
        "contributes 0 and counts as a batch in the mean of per-batch values, as in pytorch-metric-learning",
    ),
    "top_k_covers_all_classes": (
        WARNING,
        "top_k_accuracy with k >= K, the number of classes: every label is among the top k, so the value is 1.0 and says nothing",
    ),
    "binned_estimate": (INFO, "the value is computed from a fixed histogram (approximate), not from exact scores"),
    "sum_overflow": (ERROR, "a state sum overflowed float64 to inf from finite inputs (weights of 1e308, say); the values are NaN"),
}


@dataclass
class Diagnostic:
    """One finding: ``code`` from :data:`CODES`, a severity and a message a person can act on."""

    code: str
    severity: str
    message: str
    function: str = ""  # alias of the function that raised it, "" for request-level findings
    count: int = 1  # how many batches raised it (run totals add these up)

    def key(self) -> tuple[str, str]:
        # One entry per code and function: run totals add up counts and keep the first message.
        return (self.code, self.function)


@dataclass
class Diagnostics:
    """An ordered, de-duplicated collection of diagnostics.

    A check may be deferred (:meth:`defer`): it runs before the next
    diagnostic is added and before the collection is read, so the order of
    the findings is the one of an immediate check, and a check that a later
    pass settles for free (the row statistics proving scores finite) costs
    nothing."""

    items: dict[tuple[str, str], Diagnostic] = field(default_factory=dict)
    _deferred: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    def defer(self, check: Callable[[], None]) -> None:
        """Run ``check`` (which may add diagnostics) before the next add or read."""
        self._deferred.append(check)

    def settle(self) -> None:
        """Run the deferred checks now."""
        while self._deferred:
            checks, self._deferred = self._deferred, []  # a check that adds a diagnostic does not rerun itself
            for check in checks:
                check()

    def add(self, code: str, message: str, *, function: str = "", severity: str | None = None, count: int = 1) -> None:
        if code not in CODES:
            raise KeyError(f"unknown diagnostic code {code!r}")
        self.settle()
        d = Diagnostic(code, severity or CODES[code][0], message, function, count)
        existing = self.items.get(d.key())
        if existing is None:
            self.items[d.key()] = d
        else:
            existing.count += count

    def extend(self, other: Diagnostics | list[Diagnostic]) -> None:
        for d in list(other):
            self.add(d.code, d.message, function=d.function, severity=d.severity, count=d.count)

    def codes(self) -> list[str]:
        return [d.code for d in self]

    def __iter__(self) -> Iterator[Diagnostic]:
        self.settle()
        return iter(self.items.values())

    def __len__(self) -> int:
        self.settle()
        return len(self.items)
