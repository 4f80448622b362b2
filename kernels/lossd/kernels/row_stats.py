"""Row statistics: per-row logsumexp, max, argmax, Σz and entropy of scores over their classes.

Every softmax loss, accuracy and calibration statistic reads these, so they
are computed once per tensor and class dim (memoized by
:class:`lossd.kernels.batch.Batch`).  On CUDA with triton installed, one
Triton kernel (:mod:`lossd.kernels.triton.row_stats`) reads the scores once for
four of them; elsewhere torch computes them block by block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

from lossd.kernels.chunks import cache_blocks, iter_row_chunks, only_block, row_count
from lossd.kernels.dtypes import compute_dtype

__all__ = ["RowStats", "row_statistics", "row_entropy", "top1_confidence"]

# Rows whose max score lies within ±this take logsumexp as log Σ e^z, unshifted:
# e^60 · 1e12 classes is still far from the float32 limit, e^-60 far from its
# subnormals.
_UNSHIFTED_MAX = 60.0


class RowStats:
    """Per-row statistics of a score tensor over its class dimension.

    Shapes are the input's shape without the class dimension; values are in
    the compute dtype (fp32, or fp64 for fp64 inputs).  ``lse`` and ``max``
    are always there; ``argmax`` and ``sum`` may be left to their first use
    (computed then from ``source``, the scores and their class dim), because
    on CPU each is a pass over the scores of its own that cross-entropy alone
    never needs.  ``entropy`` is None unless it was asked for."""

    __slots__ = ("lse", "max", "entropy", "_argmax", "_sum", "_source")

    def __init__(
        self,
        lse: torch.Tensor,  # logsumexp over classes
        max: torch.Tensor,  # max score
        argmax: torch.Tensor | None = None,  # int64 index of the max (first on ties)
        sum: torch.Tensor | None = None,  # Σ_k z_k
        entropy: torch.Tensor | None = None,  # −Σ_k p_k log p_k, only when asked for
        *,
        source: tuple[torch.Tensor, int] | None = None,
    ) -> None:
        if source is None and (argmax is None or sum is None):
            raise ValueError("RowStats needs argmax and sum, or the source (scores, class_dim) to compute them from")
        self.lse, self.max, self.entropy = lse, max, entropy
        self._argmax, self._sum, self._source = argmax, sum, source

    @property
    def argmax(self) -> torch.Tensor:
        """int64 index of the max score (the first on ties; a NaN counts as the max, as in torch)."""
        if self._argmax is None:
            self._argmax = _row_reduce(self._scores(), lambda b: b.argmax(dim=1), torch.int64).reshape(self.lse.shape)
            self._release_source()
        return self._argmax

    @property
    def sum(self) -> torch.Tensor:
        """Σ_k z_k per row (label smoothing and the probabilities-as-logits diagnostic need it)."""
        if self._sum is None:
            self._sum = _row_reduce(self._scores(), lambda b: b.sum(dim=1), self.lse.dtype).reshape(self.lse.shape)
            self._release_source()
        return self._sum

    @property
    def top1_confidence(self) -> torch.Tensor:
        """max_k softmax(z)_k = exp(max − lse), without materializing softmax."""
        return torch.exp(self.max - self.lse)

    def _scores(self) -> tuple[torch.Tensor, int]:
        if self._source is None:  # __init__ refuses this; a programming error, never the caller's
            raise RuntimeError("RowStats lost the scores it needs to compute a lazy field")
        return self._source

    def _release_source(self) -> None:
        if self._argmax is not None and self._sum is not None:
            self._source = None  # nothing left to compute: do not keep the scores alive


def _row_reduce(source: tuple[torch.Tensor, int], reduce: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """reduce(block [m, K] in the compute dtype) -> [m], over every row of the source, flat."""
    x, class_dim = source
    compute = compute_dtype(x.dtype)
    whole = only_block(x, class_dim)
    if whole is not None:
        return reduce(whole.to(compute)).to(dtype)
    out = torch.empty(row_count(x, class_dim), dtype=dtype, device=x.device)
    for row, z in cache_blocks(x, class_dim):
        out[row : row + z.shape[0]] = reduce(z.to(compute))  # argmax of bf16 is 4x slower than of its fp32 copy
    return out


class _Block(NamedTuple):
    """A block's logsumexp pieces: e = exp(z − shift), lse = log Σe + shift (no shift: 0)."""

    max: torch.Tensor
    lse: torch.Tensor
    e: torch.Tensor
    total: torch.Tensor  # Σe
    shift: torch.Tensor | None


def _block_logsumexp(z: torch.Tensor) -> _Block:
    """The logsumexp of each row of a block [m, K] in its compute dtype, and its pieces.

    The same values as torch.logsumexp (whose own amax would be a second one);
    rows of all −inf give lse = −inf, and a +inf or NaN max propagates."""
    values = z.amax(dim=1)  # amax: max(dim) also tracks indices, 4x slower on CPU
    if bool((values.abs() <= _UNSHIFTED_MAX).all()):
        # No row max beyond ±60: Σ e^z can neither overflow nor lose its largest term,
        # so the shift by the max (a subtraction pass) is skipped: 15-20% faster on CPU.
        e = torch.exp(z)
        total = e.sum(dim=1)
        return _Block(values, torch.log(total), e, total, None)
    shift = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    e = torch.exp(z - shift[:, None])
    total = e.sum(dim=1)
    return _Block(values, torch.log(total).add_(shift), e, total, shift)


def _block_entropy(z: torch.Tensor, block: _Block) -> torch.Tensor:
    """H = log Σe − Σ_k p_k (z_k − shift) per row, p = e / Σe (``block.e`` is overwritten).

    The shifted form keeps the digits that lse − Σ p z loses to cancellation
    when scores are large (logits near 1e4 in float32).  p·(z − shift) counts
    as 0 where p is 0 (z = −inf) or NaN (the 0/0 of a row of −inf), as
    0·log 0 = 0 in the entropy."""
    shifted = z if block.shift is None else z - block.shift[:, None]
    p = block.e.div_(block.total[:, None])
    zero = (p > 0).logical_not_()
    return torch.log(block.total) - p.mul_(shifted).masked_fill_(zero, 0).sum(dim=1)


def row_entropy(x: torch.Tensor, class_dim: int) -> torch.Tensor:
    """Predictive entropy per row of ``x`` (its shape without the class dim), in the compute dtype.

    For an entropy asked for after the shared statistics were made; a pass of
    its own, as precise as the one :func:`row_statistics` makes on request."""
    whole = only_block(x, class_dim)
    if whole is not None:
        z = whole.to(compute_dtype(x.dtype))
        return _block_entropy(z, _block_logsumexp(z))
    out = torch.empty(row_count(x, class_dim), dtype=compute_dtype(x.dtype), device=x.device)
    for row, z in cache_blocks(x, class_dim):
        z = z.to(out.dtype)
        out[row : row + z.shape[0]] = _block_entropy(z, _block_logsumexp(z))
    return out.reshape(x.shape[:class_dim] + x.shape[class_dim + 1 :])


def row_statistics(x: torch.Tensor, class_dim: int, with_entropy: bool) -> RowStats:
    """:class:`RowStats` of ``x`` in one pass over it: lse and max (and entropy when asked for).

    On CUDA with triton installed, one Triton kernel reads 16- and 32-bit
    scores once for lse, max, argmax and Σz (:mod:`lossd.kernels.triton.row_stats`;
    float64 stays on torch, in float64).  Elsewhere torch computes lse and max
    block by block and leaves argmax and Σz to their first use: on CPU each
    costs a pass of its own (argmax alone about half of the logsumexp), which
    cross-entropy never needs."""
    kernel = _row_stats_kernel() if x.is_cuda and x.dtype != torch.float64 else None
    if kernel is not None:
        stats = RowStats(*kernel.row_statistics_triton(x, class_dim))
        if with_entropy:
            stats.entropy = row_entropy(x, class_dim)
        return stats
    dtype = compute_dtype(x.dtype)
    whole = only_block(x, class_dim)
    if whole is not None:  # one block: its results are the statistics, no buffers to copy them into
        z = whole.to(dtype)
        block = _block_logsumexp(z)
        entropy = _block_entropy(z, block) if with_entropy else None
        return RowStats(block.lse, block.max, entropy=entropy, source=(x, class_dim))
    out_shape = x.shape[:class_dim] + x.shape[class_dim + 1 :]
    rows = math.prod(out_shape)
    lse = torch.empty(rows, dtype=dtype, device=x.device)
    mx = torch.empty(rows, dtype=dtype, device=x.device)
    ent = torch.empty(rows, dtype=dtype, device=x.device) if with_entropy else None
    for row, z in cache_blocks(x, class_dim):
        z = z.to(dtype)
        block = _block_logsumexp(z)
        stop = row + z.shape[0]
        lse[row:stop], mx[row:stop] = block.lse, block.max
        if ent is not None:  # from the same e: no second exp
            ent[row:stop] = _block_entropy(z, block)
    entropy = None if ent is None else ent.reshape(out_shape)
    return RowStats(lse.reshape(out_shape), mx.reshape(out_shape), entropy=entropy, source=(x, class_dim))


@functools.cache
def _row_stats_kernel() -> ModuleType | None:
    """The Triton row-statistics module, or None when triton is not installed.

    Only a missing ``triton`` package means "use torch": any other import
    error (a broken install, a bug in the kernel module) is raised."""
    try:
        from lossd.kernels.triton import row_stats
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == "triton" or exc.name.startswith("triton.")):
            return None
        raise
    return row_stats


def top1_confidence(x: torch.Tensor, class_dim: int) -> torch.Tensor:
    """max_k softmax(z)_k of log-space scores as 1 / Σ exp(z − max), float64, shaped as ``x`` without ``class_dim``.

    The top class's term is exactly 1, so a representable confidence (1/2 for
    two tied logits) is exact, where exp(max − lse) may land an ulp off it.
    The sum runs in the compute dtype, one pass as cheap as the logsumexp.
    :class:`lossd.kernels.batch.Batch` memoizes it: the ECE family and monitoring share one pass."""
    precision = compute_dtype(x.dtype)
    whole = only_block(x, class_dim)
    if whole is not None:  # one block: no buffer to copy its rows into
        return _block_top1_confidence(whole.to(precision))
    out = torch.empty(row_count(x, class_dim), dtype=torch.float64, device=x.device)
    for first, rows in iter_row_chunks(x, class_dim):
        out[first : first + rows.shape[0]] = _block_top1_confidence(rows.to(precision))
    return out.reshape(x.shape[:class_dim] + x.shape[class_dim + 1 :])


def _block_top1_confidence(z: torch.Tensor) -> torch.Tensor:
    """1 / Σ_k exp(z_k − max) per row of a block [m, K] in its compute dtype, as float64 [m]."""
    peak = z.amax(dim=1, keepdim=True)
    total = torch.exp(z - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))).sum(dim=1)
    return 1.0 / total.to(torch.float64)
