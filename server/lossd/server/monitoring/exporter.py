"""The Prometheus side of monitoring's worker: admitted label sets resolved once, their children kept.

Each observation increments a few dozen labelled series. ``family.labels(...)``
validates and stringifies the values and takes the family's lock (2-3 µs), and
the admission of client-chosen labels (:class:`~lossd.server.monitoring.labels.Admission`)
builds its cost tables each time: together more than the increments
themselves. Here a tag set's exported key, the reasons it was folded for, and
every child it writes to are resolved on first sight and kept (in a bounded
cache: forgetting an entry only costs resolving it again), so that an
observation is plain increments.

Exact replays: a fold is counted on every observation it applies to, as
:class:`~lossd.server.monitoring.labels.Admission` counts it, and admission is
stable (an admitted combination stays admitted, a refused one stays refused:
the series counted only grow). :class:`Pending` sums the integer-valued
increments of several observations (rows, evaluations, calibration counts),
which floating point adds exactly in any order; amounts that may be
fractional (Σ confidence, numerators, denominators) are added one observation
at a time, in order, as before.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossd.server.monitoring.families import Families
from lossd.server.monitoring.history import SeriesKey
from lossd.server.monitoring.labels import Admission

__all__ = ["Exporter", "FunctionSeries", "Pending", "TagSeries"]

# Entries (tag sets, their functions, reason children) kept at most; past it the cache starts over.
MAX_CACHED = 4096


class BoundedCache:
    """A dict that starts over when full: every value can be recomputed, none is needed forever."""

    def __init__(self, max_entries: int = MAX_CACHED) -> None:
        self.max_entries = max_entries
        self._values: dict[Hashable, Any] = {}

    def get(self, key: Hashable) -> Any:
        """The cached value, or None."""
        return self._values.get(key)

    def put(self, key: Hashable, value: Any) -> Any:
        """Keep ``value`` (clearing the cache first when it is full) and return it."""
        if len(self._values) >= self.max_entries:
            self._values.clear()
        self._values[key] = value
        return value


@dataclass
class TagSeries:
    """One exported (model, dataset, split): its key, why its labels were folded, and its children."""

    key: SeriesKey
    folds: tuple[str, ...]
    rows: Any
    tokens: Any
    last_seen: Any
    evaluations: dict[str, Any]  # method -> child
    predictions: list[Any]  # per bin
    confidence: list[Any]
    correct: list[Any]


@dataclass
class FunctionSeries:
    """One result's exported numerator and denominator children, under its (guarded) function label."""

    label: str
    folds: tuple[str, ...]
    numerator: Any
    denominator: Any


@dataclass
class Pending:
    """Integer-valued increments summed over observations, applied once (see the module docstring)."""

    counts: dict[int, list[Any]] = field(default_factory=dict)  # id(child) -> [child, amount]

    def add(self, child: Any, amount: float) -> None:
        """Count ``amount`` (an integer) on ``child``."""
        slot = self.counts.get(id(child))
        if slot is None:
            self.counts[id(child)] = [child, amount]
        else:
            slot[1] += amount

    def add_bins(self, children: Sequence[Any], amounts: np.ndarray) -> None:
        """Per-bin integer amounts (zero bins are left out: adding 0 changes nothing)."""
        for b in amounts.nonzero()[0].tolist():
            self.add(children[b], float(amounts[b]))

    def apply(self) -> None:
        """Apply and forget everything pending."""
        for child, amount in self.counts.values():
            child.inc(amount)
        self.counts.clear()


class Exporter:
    """Resolves label sets and children for the worker thread (not thread-safe: the worker's own)."""

    def __init__(self, families: Families, admission: Admission, bin_labels: Sequence[str]) -> None:
        self.m, self.admission, self.bin_labels = families, admission, tuple(bin_labels)
        self._tags, self._functions, self._children = BoundedCache(), BoundedCache(), BoundedCache()

    def child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, cached."""
        key = (id(family), labels)
        found = self._children.get(key)
        return found if found is not None else self._children.put(key, family.labels(*labels))

    def fold(self, pending: Pending, reasons: Iterable[str]) -> None:
        """Count observations exported under ``__other__``, by reason."""
        for reason in reasons:
            pending.add(self.child(self.m.folded, reason), 1.0)

    def tag_series(self, model: str, dataset: str, split: str) -> TagSeries:
        """The series of a request's tags (created at 0 on first sight, so sums over bins never miss one)."""
        raw = (model, dataset, split)
        found: TagSeries | None = self._tags.get(raw)
        if found is not None:
            return found
        folds: list[str] = []
        key = self.admission.tags(model, dataset, split, folds=folds)
        m, uppers = self.m, self.bin_labels
        series = TagSeries(
            key,
            tuple(folds),
            m.rows.labels(*key),
            m.tokens.labels(*key),
            m.last_seen.labels(*key),
            {},
            [m.cal_predictions.labels(*key, upper) for upper in uppers],
            [m.cal_confidence.labels(*key, upper) for upper in uppers],
            [m.cal_correct.labels(*key, upper) for upper in uppers],
        )
        return self._tags.put(raw, series)  # type: ignore[no-any-return]

    def evaluations(self, series: TagSeries, method: str) -> Any:
        """The evaluations child of a tag set and method."""
        child = series.evaluations.get(method)
        if child is None:
            child = series.evaluations[method] = self.m.evaluations.labels(*series.key, method)
        return child

    def function_series(self, series: TagSeries, alias: str, function: str) -> FunctionSeries:
        """The numerator and denominator children of one result of a request with these tags."""
        raw = (series.key, alias, function)
        found: FunctionSeries | None = self._functions.get(raw)
        if found is not None:
            return found
        folds: list[str] = []
        labels, metric = self.admission.function(series.key, alias, function, folds=folds)
        m = self.m
        numerator, denominator = (m.metric_numerator, m.metric_denominator) if metric else (m.loss_numerator, m.loss_denominator)
        made = FunctionSeries(labels[-1], tuple(folds), numerator.labels(*labels), denominator.labels(*labels))
        return self._functions.put(raw, made)  # type: ignore[no-any-return]
