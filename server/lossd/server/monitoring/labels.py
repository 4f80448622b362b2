"""The cardinality guard: client-chosen labels never grow Prometheus past a bound on series.

Tags (model, dataset, split) and function aliases come from requests, and each
new combination of them is a new set of series. Capping each label on its own
bounds nothing (100 models × 100 datasets × 100 splits × functions × bins is
millions of series), so the bound is on series themselves:

- a :class:`LabelGuard` first folds values that are too long (or off the
  allowlist) into :data:`OTHER`;
- a :class:`SeriesBudget` then admits a new label combination only while every
  family it creates series in stays within ``max_per_family`` series and all
  budgeted families together within ``max_total``; past that the combination is
  folded, whole, into :data:`OTHER`. Room for the folded combinations is
  reserved up front, so the caps hold with them included.

Admitted combinations stay admitted for the life of the process: series
already exported never change their labels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from lossd.kernels import get_function
from lossd.server.monitoring.families import METHODS, is_metric_family

__all__ = ["OTHER", "Admission", "LabelGuard", "SeriesBudget", "function_label"]

OTHER = "__other__"

FoldHook = Callable[[str], None]  # (reason) -> None


class LabelGuard:
    """Fold label values that are too long, or off the allowlist, into ``__other__``.

    ``allowlist`` (when non-empty) applies to the labels in ``allowlisted_labels``;
    the empty string (an unset tag) and ``__other__`` itself pass unchanged.
    """

    def __init__(
        self,
        *,
        max_length: int,
        allowlist: Iterable[str] = (),
        allowlisted_labels: Iterable[str] = ("model", "dataset", "split"),
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        self.max_length = max_length
        self.allowlist = frozenset(allowlist)
        self.allowlisted_labels = frozenset(allowlisted_labels)

    def refusal(self, label: str, value: str) -> str | None:
        """Why ``value`` may not be exported for ``label`` (``too_long``, ``not_allowlisted``), or None."""
        if value in ("", OTHER):  # unset tags, and clients folding values themselves
            return None
        if len(value) > self.max_length:
            return "too_long"
        if self.allowlist and label in self.allowlisted_labels and value not in self.allowlist:
            return "not_allowlisted"
        return None


class SeriesBudget:
    """Admit label combinations while the series they create fit the caps (see the module docstring).

    A *group* is a set of families keyed by the same client-chosen labels (the
    tag set (model, dataset, split); the tag set plus function). A combination's
    ``costs`` are the series it creates in each family of its group (a
    calibration family creates one per bin, the evaluations family one per
    method). :meth:`reserve` sets aside room for a group's folded combination.
    """

    def __init__(self, *, max_per_family: int, max_total: int) -> None:
        if max_per_family < 1 or max_total < 1:
            raise ValueError(f"max_per_family and max_total: expected >= 1, got {max_per_family} and {max_total}")
        self.max_per_family = max_per_family
        self.max_total = max_total
        self._series: dict[str, int] = {}  # family -> series counted against the caps (reservations included)
        self._admitted: dict[str, set[tuple[str, ...]]] = {}  # group -> admitted combinations
        self._lock = threading.Lock()

    def reserve(self, costs: Mapping[str, int]) -> None:
        """Count the series of one folded combination against the caps from the start."""
        with self._lock:
            for family, n in costs.items():
                self._series[family] = self._series.get(family, 0) + n

    def admit(self, group: str, key: tuple[str, ...], costs: Mapping[str, int]) -> str | None:
        """None when ``key`` may be exported in ``group``, else why not (``family_cap``, ``total_cap``)."""
        with self._lock:
            admitted = self._admitted.setdefault(group, set())
            if key in admitted:
                return None
            if any(self._series.get(f, 0) + n > self.max_per_family for f, n in costs.items()):
                return "family_cap"
            if sum(self._series.values()) + sum(costs.values()) > self.max_total:
                return "total_cap"
            admitted.add(key)
            for family, n in costs.items():
                self._series[family] = self._series.get(family, 0) + n
            return None

    def series(self) -> dict[str, int]:
        """Series counted per family now (admitted combinations plus the reserved folded ones)."""
        with self._lock:
            return dict(self._series)


FOLDED_TAGS = (OTHER, OTHER, OTHER)


def function_label(alias: str, function: str) -> str:
    """The ``function`` label of a result: its catalogue name, plus the alias when they differ.

    ``cross_entropy[ce_smoothed]``: no alias can pass one function's numbers off
    as another's, and differently parameterized results stay apart."""
    return function if alias == function else f"{function}[{alias}]"


def tag_costs(bins: int) -> dict[str, int]:
    """Series one tag set creates, per family (an evaluations series per method, a calibration one per bin)."""
    per_bin = dict.fromkeys(("lossd_calibration_predictions", "lossd_calibration_confidence", "lossd_calibration_correct"), bins)
    per_tags = dict.fromkeys(("lossd_evaluated_rows", "lossd_evaluated_tokens", "lossd_last_evaluation_timestamp_seconds"), 1)
    return {"lossd_evaluations": len(METHODS), **per_tags, **per_bin}


def function_costs(metric: bool) -> dict[str, int]:
    """Series one (tag set, function) creates: its numerator and its denominator."""
    kind = "metric" if metric else "loss"
    return {f"lossd_{kind}_numerator": 1, f"lossd_{kind}_denominator": 1}


class Admission:
    """The labels an observation is exported under: guarded values, then the series budget."""

    def __init__(self, guard: LabelGuard, budget: SeriesBudget, bins: int, *, on_fold: FoldHook) -> None:
        self.guard, self.budget, self.bins, self._on_fold = guard, budget, bins, on_fold
        for costs in (tag_costs(bins), function_costs(False), function_costs(True)):
            budget.reserve(costs)  # the folded (__other__) series of each group never pass the caps

    def _value(self, label: str, value: str, folds: list[str]) -> str:
        reason = self.guard.refusal(label, value)
        if reason is None:
            return value
        folds.append(reason)
        return OTHER

    def _counted(self, folds: list[str], given: list[str] | None) -> None:
        if given is not None:
            given.extend(folds)  # the caller counts them (on every observation they apply to)
        else:
            for reason in folds:
                self._on_fold(reason)

    def tags(self, model: str, dataset: str, split: str, *, folds: list[str] | None = None) -> tuple[str, str, str]:
        """(model, dataset, split) as exported: themselves, or folded into ``__other__``.

        The reasons of the folds go to ``on_fold``, or into ``folds`` when given."""
        reasons: list[str] = []
        key = (self._value("model", model, reasons), self._value("dataset", dataset, reasons), self._value("split", split, reasons))
        refusal = self.budget.admit("tags", key, tag_costs(self.bins))
        if refusal is not None:
            reasons.append(refusal)
            key = FOLDED_TAGS
        self._counted(reasons, folds)
        return key

    def function(
        self, key: tuple[str, str, str], alias: str, function: str, *, folds: list[str] | None = None
    ) -> tuple[tuple[str, ...], bool]:
        """The labels (tags + function) of a result's numerator and denominator, and whether it is a metric (folds: see :meth:`tags`)."""
        metric = is_metric_family(get_function(function).family)
        reasons: list[str] = []
        labels: tuple[str, ...] = (*key, self._value("function", function_label(alias, function), reasons))
        refusal = self.budget.admit("metric_functions" if metric else "loss_functions", labels, function_costs(metric))
        if refusal is not None:
            reasons.append(refusal)
            labels = (*FOLDED_TAGS, OTHER)
        self._counted(reasons, folds)
        return labels, metric
