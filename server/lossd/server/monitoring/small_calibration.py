"""The top-1 calibration counters of a small CPU batch, bit for bit those of the general path, at a tenth of its cost.

Monitoring bins every batch it observes (:mod:`lossd.server.monitoring.calibration`).
The general path calls :func:`lossd.kernels.row_stats.top1_confidence` and
:func:`lossd.kernels.calibration.bins.bin_sums`: a dozen torch operations and
the chunking machinery, about 300 µs per [64, 10] batch, most of it per-call
overhead on tensors of a few hundred elements. Here the same values come from
numpy for every step whose result IEEE arithmetic fixes (argmax, comparisons,
the bin rule, sums in input order), and from torch's softmax for the
confidence, the kernel's own operation (which computes each row alone).
``tests/unit/server/test_monitoring_small_calibration.py`` checks the equality
on ties, bin edges and non-finite rows.

Only CPU batches whose scores are class-last (``[N, K]``, ``[B, T, V]``) and
small (:data:`SMALL_ELEMENTS`) take this path.

:func:`small_multiclass_many` bins many such batches at once (the monitoring
worker takes queued events together): every step runs once over their rows
put end to end, the softmax included. Per-bin sums of each batch are still
added in its input order (``np.bincount`` over (batch, bin) slots): each
batch's counters are those of :func:`small_multiclass`, bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lossd.kernels.calibration.bins import rounded_edges
from lossd.kernels.dtypes import compute_dtype

__all__ = ["SMALL_ELEMENTS", "BinSums", "SmallBatch", "is_small", "small_multiclass", "small_multiclass_many"]

# (n_b, Σ confidence, Σ correct) per bin, float64 arrays of length B.
BinSums = tuple[np.ndarray, np.ndarray, np.ndarray]

# At most this many score elements: where the general path's dozen torch calls cost more in
# per-call overhead than in arithmetic.
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
def _edges(bins: int, precision: torch.dtype) -> np.ndarray:
    """``bin_index``'s edges (rounded to the confidences' ``precision``) as a read-only numpy array."""
    edges = rounded_edges(bins, precision).numpy()
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
    with a NaN differ, and are never binned: their confidence is NaN), and the
    confidence max_k softmax(z)_k from torch's kernel, as float64. The
    bin rule is that of ``bin_index``: the b with b/B < c <= (b+1)/B against
    the edges rounded to the compute dtype (0 in bin 0), which is what its
    ceil-and-correct settles on.
    """
    parts = [(b.scores if b.scores.dtype == precision else b.scores.to(precision)).numpy().reshape(-1, classes) for b in group]
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    rows = [len(part) for part in parts]
    argmax = values.argmax(axis=1)
    # torch's softmax computes each row alone (one call over every batch's rows gives each row the
    # bits of the kernel's pass over its own batch); a row whose max is not finite is NaN, never binned.
    confidence = torch.softmax(torch.from_numpy(values), 1).amax(dim=1).numpy().astype(np.float64)
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
    slot = np.searchsorted(_edges(bins, precision), binned)
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
