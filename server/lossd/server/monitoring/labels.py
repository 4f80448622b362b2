"""The cardinality guard: client-chosen label values never grow Prometheus without bound.

Tags (model, dataset, split) and function aliases come from requests, so every
new value would be a new set of series. A :class:`LabelGuard` admits at most
``max_values`` distinct values per label (or only the allowlisted ones), no
value longer than ``max_length``, and folds everything else into
:data:`OTHER`, counting each fold by label and reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

__all__ = ["OTHER", "LabelGuard"]

OTHER = "__other__"

OverflowHook = Callable[[str, str], None]  # (label, reason) -> None


class LabelGuard:
    """Admit label values per label name; the rest become ``__other__``.

    ``allowlist`` (when non-empty) replaces the cap for the labels it applies
    to; the empty string is always admitted (an unset tag) and never counts
    against the cap. Admitted values stay admitted for the life of the
    process: series already exported never change their labels.
    """

    def __init__(
        self,
        *,
        max_values: int,
        max_length: int,
        allowlist: Iterable[str] = (),
        allowlisted_labels: Iterable[str] = ("model", "dataset", "split"),
        on_overflow: OverflowHook | None = None,
    ) -> None:
        if max_values < 1:
            raise ValueError(f"max_values: expected >= 1, got {max_values}")
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        self.max_values = max_values
        self.max_length = max_length
        self.allowlist = frozenset(allowlist)
        self.allowlisted_labels = frozenset(allowlisted_labels)
        self._on_overflow = on_overflow
        self._admitted: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def admit(self, label: str, value: str) -> str:
        """Return the value to export for ``label``: ``value`` itself or :data:`OTHER`."""
        if value in ("", OTHER):  # unset tags, and clients folding values themselves
            return value
        with self._lock:
            seen = self._admitted.setdefault(label, set())
            if value in seen:
                return value
            reason = self._refusal(label, value, len(seen))
            if reason is None:
                seen.add(value)
                return value
        if self._on_overflow is not None:
            self._on_overflow(label, reason)
        return OTHER

    def _refusal(self, label: str, value: str, admitted: int) -> str | None:
        if len(value) > self.max_length:
            return "too_long"
        if self.allowlist and label in self.allowlisted_labels:
            return None if value in self.allowlist else "not_allowlisted"
        return None if admitted < self.max_values else "cap"

    def admitted(self, label: str) -> frozenset[str]:
        """Return the values admitted so far for ``label``."""
        with self._lock:
            return frozenset(self._admitted.get(label, ()))
