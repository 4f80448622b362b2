"""The per-batch memo: one request's tensors with the intermediates several functions share.

Asking for cross-entropy, accuracy, ECE and entropy of the same logits makes
one pass over them: the row statistics of each (tensor, class dim) are
computed once and kept here, and so is what was already checked or diagnosed
about each tensor (finiteness, class balance).  Subscribers of an evaluation
(monitoring) read the memoized row statistics instead of computing them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lossd.kernels.diagnostics import Diagnostics
from lossd.kernels.row_stats import RowStats, row_entropy, row_statistics

__all__ = ["Batch"]


@dataclass
class Batch:
    """One request's tensors on the compute device, with memoized intermediates."""

    tensors: Mapping[str, torch.Tensor]
    device: torch.device
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    settings: Mapping[str, Any] = field(default_factory=dict)
    _row_stats: dict[tuple[str, int], RowStats] = field(default_factory=dict)
    _checked_finite: set[str] = field(default_factory=set)
    _judged_balance: set[str] = field(default_factory=set)  # label tensors already judged for class_imbalance

    def row_stats(self, tensor_name: str, class_dim: int, *, with_entropy: bool = False) -> RowStats:
        """The row statistics of a tensor over ``class_dim``, computed on first use and memoized."""
        key = (tensor_name, class_dim)
        stats = self._row_stats.get(key)
        if stats is None:
            stats = row_statistics(self.tensors[tensor_name], class_dim, with_entropy)
            self._row_stats[key] = stats
        elif with_entropy and stats.entropy is None:  # one more pass, for the entropy alone
            stats.entropy = row_entropy(self.tensors[tensor_name], class_dim)
        return stats

    def memoized_row_stats(self, tensor_name: str, class_dim: int) -> RowStats | None:
        """The row statistics a function already computed for this tensor and class dim, or None (never computes)."""
        return self._row_stats.get((tensor_name, class_dim))

    def add_tensor(self, name: str, tensor: torch.Tensor, *, finite_checked: bool = False) -> None:
        """Add a tensor derived from the request's (log of probabilities), visible to every later function."""
        self.tensors = {**self.tensors, name: tensor}
        if finite_checked:
            self._checked_finite.add(name)
