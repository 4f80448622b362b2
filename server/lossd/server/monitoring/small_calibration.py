"""The top-1 calibration counters of a small CPU batch, bit for bit those of the general path, at a tenth of its cost.

Monitoring bins every batch it observes (:mod:`lossd.server.monitoring.calibration`).
The general path calls :func:`lossd.kernels.row_stats.top1_confidence` and
:func:`lossd.kernels.calibration.bins.bin_sums`: a dozen torch operations and
the chunking machinery, about 300 µs per [64, 10] batch, most of it per-call
overhead on tensors of a few hundred elements. Here the same values come from
numpy for every step whose result IEEE arithmetic fixes (max, subtraction,
division, comparisons, the bin rule, sums in input order), from numpy's exp
as the kernel's pass on CPU (element by element the same wherever an element
lies in an array), and from torch for the one step whose digits depend on
torch's own kernels (the row sum of the exponentials), applied to the same
tensor as the kernel's single chunk.
``tests/unit/server/test_monitoring_small_calibration.py`` checks the equality
on ties, bin edges and non-finite rows.

Only CPU batches whose scores are class-last (``[N, K]``, ``[B, T, V]``) and
small enough to be one chunk and one unsplit torch loop take this path.

:func:`small_multiclass_many` bins many such batches at once (the monitoring
worker takes queued events together): the row-wise numpy steps run once over
their rows put end to end, and only the torch step runs per batch, on exactly
that batch's rows, so that every row is summed as alone. Per-bin
sums of each batch are still added in its input order (``np.bincount`` over
(batch, bin) slots): each batch's counters are those of :func:`small_multiclass`, bit for bit.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lossd.kernels.dtypes import compute_dtype

__all__ = ["SMALL_ELEMENTS", "BinSums", "SmallBatch", "is_small", "small_multiclass", "small_multiclass_many"]

# (n_b, Σ confidence, Σ correct) per bin, float64 arrays of length B.
BinSums = tuple[np.ndarray, np.ndarray, np.ndarray]

# At most this many score elements: torch runs an op over a contiguous tensor below its parallel
# grain (32768) as one loop, so the row sums see the same vector/tail split as in the kernel's pass.
SMALL_ELEMENTS = 32768

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_small(z: torch.Tensor, class_dim: int) -> bool:
    """Whether ``z``'s top-1 statistics can be computed here (CPU, class-last, contiguous, one small block)."""
    return (
        z.device.type == "cpu"
        and z.dtype in _FLOATS
        and z.ndim >= 2
        and class_dim == z.ndim - 1
        and 0 < z.numel() <= SMALL_ELEMENTS
        and z.is_contiguous()
    )


@functools.lru_cache(maxsize=64)
def _edges(bins: int) -> np.ndarray:
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    edges.flags.writeable = False
    return edges


@dataclass(frozen=True)
class SmallBatch:
    """One batch's multiclass calibration inputs: scores that pass :func:`is_small`, their labels, the function's params."""

    scores: torch.Tensor  # [..., K], class-last
    labels: torch.Tensor
    shift: bool  # token-level: position t predicts token t + 1
    ignore_index: int | None

    def labels_fit(self) -> bool:
        """Whether the labels have the shape of the scores' rows (else the batch is skipped as ``shape_mismatch``)."""
        return tuple(self.labels.shape) == tuple(self.scores.shape[:-1])


def small_multiclass(z: torch.Tensor, labels: torch.Tensor, bins: int, *, shift: bool, ignore_index: int | None) -> BinSums | str:
    """The per-bin sums of :func:`lossd.server.monitoring.calibration._multiclass`, step for step, or why there are none."""
    batch = SmallBatch(z, labels, shift, ignore_index)
    return small_multiclass_many([batch], bins)[0] if batch.labels_fit() else "shape_mismatch"


def small_multiclass_many(batches: Sequence[SmallBatch], bins: int) -> list[BinSums]:
    """:func:`small_multiclass` of each batch (whose labels fit), computed together, in the order given."""
    groups: dict[tuple[torch.dtype, int, bool, int | None], list[int]] = {}
    for i, b in enumerate(batches):  # rows put end to end must share the dtype, K and the row rule
        groups.setdefault((compute_dtype(b.scores.dtype), b.scores.shape[-1], b.shift, b.ignore_index), []).append(i)
    out: dict[int, BinSums] = {}
    for (precision, classes, shift, ignore_index), members in groups.items():
        sums = _group_sums([batches[i] for i in members], precision, classes, shift, ignore_index, bins)
        out.update(zip(members, sums, strict=True))
    return [out[i] for i in range(len(batches))]


def _int_labels(labels: torch.Tensor) -> np.ndarray:
    y = labels if labels.dtype == torch.int64 else (labels.round() if labels.is_floating_point() else labels).to(torch.int64)
    return y.numpy().reshape(-1)


def _group_sums(
    group: Sequence[SmallBatch], precision: torch.dtype, classes: int, shift: bool, ignore_index: int | None, bins: int
) -> list[BinSums]:
    """The per-bin sums of batches that share a dtype, K, shift and ignore_index, one pass over all their rows.

    Per row, in the compute dtype: argmax (the first maximum, as torch's; rows
    with a NaN differ, and are never binned: their confidence is NaN), the max,
    z − max (no shift where the max is not finite, as the kernel does), then
    numpy's exp, per batch torch's row sum, and confidence = 1 / Σ in float64. The
    bin rule is that of ``bin_index``: the b with b/B < c <= (b+1)/B against
    the float64 edges (0 in bin 0), which is what its ceil-and-correct settles on.
    """
    parts = [(b.scores if b.scores.dtype == precision else b.scores.to(precision)).numpy().reshape(-1, classes) for b in group]
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    rows = [len(part) for part in parts]
    argmax = values.argmax(axis=1)
    peak = values[np.arange(values.shape[0]), argmax]
    finite = np.isfinite(peak)
    if not finite.all():  # no shift where the max is not finite
        peak = np.where(finite, peak, np.zeros_like(peak))
    shifted = values - peak[:, None]
    total = _exp_row_sums(shifted, rows)
    # A row's terms are <= 1 and one is 1: 1 <= Σ <= K, a finite confidence, except for a row of −inf
    # (1 / 0, an infinite confidence never binned, as in torch) or with a NaN.
    with np.errstate(divide="ignore"):
        confidence = 1.0 / total
    labels = [_int_labels(b.labels) for b in group]
    y = labels[0] if len(labels) == 1 else np.concatenate(labels)
    keep = np.isfinite(confidence)
    if shift:  # pair position t with token t + 1 of the same sequence; each sequence's last position predicts nothing
        y = _next_tokens(group, y, keep)
    keep &= (y >= 0) & (y < classes)
    if ignore_index is not None:
        keep &= y != ignore_index
    every_row = bool(keep.all())  # the usual case: no row to leave out, no copies
    binned = confidence if every_row else confidence[keep]
    slot = np.searchsorted(_edges(bins), binned)
    slot -= 1
    np.maximum(slot, 0, out=slot)
    np.minimum(slot, bins - 1, out=slot)
    if len(group) > 1:  # (batch, bin) slots: bincount adds each slot's weights in input order, as each batch alone
        owner = np.repeat(np.arange(len(group)) * bins, rows)
        slot += owner if every_row else owner[keep]
    size = len(group) * bins
    count = np.bincount(slot, minlength=size).astype(np.float64).reshape(-1, bins)
    confidence_sums = np.bincount(slot, weights=binned, minlength=size).reshape(-1, bins)
    hits = argmax == y
    correct = (hits if every_row else hits[keep]).astype(np.float64)
    correct_sums = np.bincount(slot, weights=correct, minlength=size).reshape(-1, bins)
    return [(count[j], confidence_sums[j], correct_sums[j]) for j in range(len(group))]


def _exp_row_sums(shifted: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """Σ_k exp(row) per row in the compute dtype (as float64): numpy's exp, torch's sum run as on each batch alone.

    Batches of equal size go through torch together, a few at a time, as the
    rows of a [batches, elements] view whose row stride is one element longer:
    torch cannot merge such rows into one loop, so each runs its own loop over
    exactly one batch's elements, with that batch's vector/tail split, and
    below the parallel grain (``SMALL_ELEMENTS``) no thread splits a row."""
    with np.errstate(over="ignore", invalid="ignore"):  # rows not shifted (a +inf max) overflow to inf, as in the kernel
        exps = np.exp(shifted)
    if len(rows) == 1:  # one batch: its own tensor
        total: np.ndarray = torch.from_numpy(exps).sum(dim=1).numpy().astype(np.float64)
        return total
    classes = shifted.shape[1]
    starts = [0, *itertools.accumulate(rows)]
    total = np.empty(shifted.shape[0], dtype=np.float64)
    by_size: dict[int, list[int]] = {}
    for i, n in enumerate(rows):
        by_size.setdefault(n, []).append(i)
    for n, members in by_size.items():
        elements = n * classes
        per_call = max(1, SMALL_ELEMENTS // elements)
        for first in range(0, len(members), per_call):
            call = members[first : first + per_call]
            padded = np.empty((len(call), elements + 1), dtype=shifted.dtype)
            adjacent = call[-1] - call[0] == len(call) - 1  # the usual case: one slice, no per-batch copies
            if adjacent:
                padded[:, :elements] = exps[starts[call[0]] : starts[call[-1] + 1]].reshape(len(call), elements)
            else:
                for row, i in enumerate(call):
                    padded[row, :elements] = exps[starts[i] : starts[i + 1]].reshape(-1)
            sums = torch.from_numpy(padded)[:, :elements].reshape(len(call), n, classes).sum(dim=2).numpy()
            if adjacent:
                total[starts[call[0]] : starts[call[-1] + 1]] = sums.reshape(-1)
            else:
                for row, i in enumerate(call):
                    total[starts[i] : starts[i + 1]] = sums[row]
    return total


def _next_tokens(group: Sequence[SmallBatch], y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels moved one position back within each sequence ([B, T] rows); ``keep`` drops each last position."""
    following = np.empty_like(y)
    start = 0
    for b in group:
        n = b.labels.numel()
        sequences, positions = b.labels.shape[0], b.labels.shape[1]
        after, source, kept = (a[start : start + n].reshape(sequences, positions, -1) for a in (following, y, keep))
        after[:, :-1] = source[:, 1:]
        after[:, -1:] = 0
        kept[:, -1:] = False
        start += n
    return following
