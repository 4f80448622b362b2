"""The per-batch memo: one request's tensors with the intermediates several functions share.

Asking for cross-entropy, accuracy, ECE and entropy of the same logits makes
one pass over them: the row statistics of each (tensor, class dim) are
computed once and kept here, and so is what was already checked or diagnosed
about each tensor (finiteness, class balance).  Subscribers of an evaluation
(monitoring) read the memoized row statistics instead of computing them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lossd.kernels.diagnostics import Diagnostics
from lossd.kernels.row_stats import RowStats, row_entropy, row_statistics, top1_confidence

__all__ = ["Batch", "entropy_wanted"]

# Functions that read the row entropy of their "logits" role over class dim 1.
_ENTROPY_FUNCTIONS = frozenset({"entropy"})


def entropy_wanted(prepared: Iterable[Any]) -> frozenset[tuple[str, int]]:
    """The (tensor, class dim) pairs whose row statistics some prepared function will ask the entropy of.

    Given to :class:`Batch`, they make the first pass over those scores compute
    the entropy from the same exponentials as the logsumexp, instead of a second
    pass when cross-entropy came first (the same values: the same blocks and operations)."""
    wanted = set()
    for p in prepared:
        if p.fdef.name in _ENTROPY_FUNCTIONS:
            name = p.inputs.get("logits", "logits")
            wanted.add((f"log({name})" if p.params.get("input_kind") == "probs" else name, 1))
    return frozenset(wanted)


@dataclass
class Batch:
    """One request's tensors on the compute device, with memoized intermediates."""

    tensors: Mapping[str, torch.Tensor]
    device: torch.device
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    settings: Mapping[str, Any] = field(default_factory=dict)
    entropy_for: frozenset[tuple[str, int]] = frozenset()  # see entropy_wanted
    _row_stats: dict[tuple[str, int], RowStats] = field(default_factory=dict)
    _top1: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    _checked_finite: set[str] = field(default_factory=set)
    _deferred_finite: set[str] = field(default_factory=set)  # see input_diagnostics.defer_nonfinite
    _judged_balance: set[str] = field(default_factory=set)  # label tensors already judged for class_imbalance
    # (labels tensor, K, ignore_index) -> labels checked by classification.class_labels, shared by
    # every function reading them: (int64 labels with ignored ones set to 0, valid mask, ignored count).
    checked_labels: dict[tuple[str, int, int | None], tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)

    def row_stats(self, tensor_name: str, class_dim: int, *, with_entropy: bool = False) -> RowStats:
        """The row statistics of a tensor over ``class_dim``, computed on first use and memoized."""
        key = (tensor_name, class_dim)
        stats = self._row_stats.get(key)
        if stats is None:
            with_entropy = with_entropy or key in self.entropy_for
            scores = self.tensors[tensor_name]
            stats = row_statistics(scores, class_dim, with_entropy)
            self._row_stats[key] = stats
            if stats.finite and scores.dtype != torch.float16:  # float16's ±65504 limit is the full check's to judge
                self._checked_finite.add(tensor_name)  # proven finite: a deferred nan_or_inf check has nothing to find
        elif with_entropy and stats.entropy is None:  # one more pass, for the entropy alone
            stats.entropy = row_entropy(self.tensors[tensor_name], class_dim)
        return stats

    def memoized_row_stats(self, tensor_name: str, class_dim: int) -> RowStats | None:
        """The row statistics a function already computed for this tensor and class dim, or None (never computes)."""
        return self._row_stats.get((tensor_name, class_dim))

    def top1_confidence(self, tensor_name: str, class_dim: int) -> torch.Tensor:
        """max_k softmax over ``class_dim`` of a log-space tensor (float64, exact at representable edges), memoized."""
        key = (tensor_name, class_dim)
        confidence = self._top1.get(key)
        if confidence is None:
            # On CPU the row pass's softmax gives the confidence with the logsumexp: one pass for
            # both, whichever function (or monitoring) asks first.
            stats = self.row_stats(tensor_name, class_dim) if self.device.type == "cpu" else self._row_stats.get(key)
            if stats is not None and stats.top1 is not None:
                confidence = stats.top1
            else:
                confidence = top1_confidence(self.tensors[tensor_name], class_dim)
            self._top1[key] = confidence
        return confidence

    def add_tensor(self, name: str, tensor: torch.Tensor, *, finite_checked: bool = False) -> None:
        """Add a tensor derived from the request's (log of probabilities), visible to every later function."""
        self.tensors = {**self.tensors, name: tensor}
        if finite_checked:
            self._checked_finite.add(name)
