"""The top-1 calibration counters of a small CPU batch, bit for bit those of the general path, at a tenth of its cost.

Monitoring bins every batch it observes (:mod:`lossd.server.monitoring.calibration`).
The general path calls :func:`lossd.kernels.row_stats.top1_confidence` and
:func:`lossd.kernels.calibration.bins.bin_sums`: a dozen torch operations and
the chunking machinery, about 300 µs per [64, 10] batch, most of it per-call
overhead on tensors of a few hundred elements. Here the same values come from
numpy for every step whose result IEEE arithmetic fixes (max, subtraction,
division, comparisons, the bin rule, sums in input order) and from torch for
the only two whose digits depend on torch's own kernels (exp, and the row sum
of the exponentials), applied to the same tensor as the kernel's single chunk.
``tests/unit/server/test_monitoring_small_calibration.py`` checks the equality
on ties, bin edges and non-finite rows.

Only CPU batches whose scores are class-last (``[N, K]``, ``[B, T, V]``) and
small enough to be one chunk and one unsplit torch loop take this path.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from lossd.kernels.dtypes import compute_dtype

__all__ = ["SMALL_ELEMENTS", "is_small", "small_bin_sums", "small_multiclass", "small_top1"]

# At most this many score elements: torch runs an elementwise op over a contiguous tensor below
# its parallel grain (32768) as one loop, so exp sees the same vector/tail split as in the kernel's pass.
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


def small_top1(z: torch.Tensor) -> tuple[np.ndarray, np.ndarray, bool]:
    """(confidence float64, argmax int64, every confidence finite), shaped as ``z`` without its last dim.

    confidence = 1 / Σ exp(z − max) in the compute dtype, as
    :func:`lossd.kernels.row_stats.top1_confidence`; argmax is the first maximum,
    as torch's (rows with a NaN differ, and are never binned: their confidence is NaN)."""
    precision = compute_dtype(z.dtype)
    values = (z if z.dtype == precision else z.to(precision)).numpy().reshape(-1, z.shape[-1])
    argmax = values.argmax(axis=1)
    peak = values[np.arange(values.shape[0]), argmax]  # the max itself (NaN when the row holds one, as amax)
    finite = bool(np.isfinite(peak).all())
    if finite:  # every row's terms are ≤ 1 and one is 1: 1 <= Σ <= K, a finite confidence
        shifted = values - peak[:, None]
    else:  # no shift where the max is not finite (as the kernel does)
        ok = np.isfinite(peak)
        shifted = values - np.where(ok, peak, np.zeros_like(peak))[:, None]
    total = torch.exp(torch.from_numpy(shifted)).sum(dim=1).numpy().astype(np.float64)
    if finite:
        confidence = 1.0 / total
    else:
        with np.errstate(divide="ignore"):  # a row of −inf: 1 / 0, an infinite confidence never binned, as in torch
            confidence = 1.0 / total
        finite = bool(np.isfinite(confidence).all())
    shape = z.shape[:-1]
    return confidence.reshape(shape), argmax.reshape(shape), finite


@functools.lru_cache(maxsize=64)
def _edges(bins: int) -> np.ndarray:
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    edges.flags.writeable = False
    return edges


def small_bin_sums(confidence: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`lossd.kernels.calibration.bins.bin_sums` of finite float64 confidences: (n_b, Σ confidence, Σ correct).

    The bin rule of ``bin_index``: the b with b/B < c <= (b+1)/B against the
    float64 edges (0 in bin 0), which is what its ceil-and-correct settles on;
    per-bin sums are added in input order, as ``index_add_`` adds them."""
    index = np.searchsorted(_edges(bins), confidence)
    index -= 1
    np.maximum(index, 0, out=index)
    np.minimum(index, bins - 1, out=index)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    return (
        count,
        np.bincount(index, weights=confidence, minlength=bins),
        np.bincount(index, weights=correct.astype(np.float64), minlength=bins),
    )


def small_multiclass(
    z: torch.Tensor, labels: torch.Tensor, bins: int, *, shift: bool, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """The per-bin sums of :func:`lossd.server.monitoring.calibration._multiclass`, step for step, or why there are none."""
    confidence, predicted, finite = small_top1(z)
    y = (labels if labels.dtype == torch.int64 else (labels.round() if labels.is_floating_point() else labels).to(torch.int64)).numpy()
    if y.shape != confidence.shape:
        return "shape_mismatch"
    if shift:  # position t predicts token t + 1
        confidence, predicted, y = confidence[:, :-1], predicted[:, :-1], y[:, 1:]
        finite = finite or bool(np.isfinite(confidence).all())
    correct = predicted == y
    if y.size:
        low, high = int(y.min()), int(y.max())
        if finite and low >= 0 and high < z.shape[-1] and (ignore_index is None or not low <= ignore_index <= high):
            return small_bin_sums(confidence.reshape(-1), correct.reshape(-1), bins)  # every row binned: no masks
    keep = (y >= 0) & (y < z.shape[-1]) & np.isfinite(confidence)
    if ignore_index is not None:
        keep &= y != ignore_index
    return small_bin_sums(confidence[keep], correct[keep], bins)
