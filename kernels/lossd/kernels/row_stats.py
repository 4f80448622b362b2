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

from lossd.kernels.chunks import CACHE_BLOCK_ELEMENTS, cache_blocks, only_block, row_count
from lossd.kernels.dtypes import as_dtype, compute_dtype

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
    never needs.  ``entropy`` is None unless it was asked for.  ``finite`` is
    True when the pass proved every score finite (the nan_or_inf check then
    needs no pass of its own), False when it could not.  ``top`` is each
    row's largest softmax probability when the pass computed the softmax (the
    CPU path; None elsewhere): ``top1`` is then the top-1 confidence, bit for
    bit :func:`top1_confidence`."""

    __slots__ = ("lse", "max", "entropy", "finite", "top", "_top1", "_argmax", "_sum", "_source")

    def __init__(
        self,
        lse: torch.Tensor,  # logsumexp over classes
        max: torch.Tensor,  # max score
        argmax: torch.Tensor | None = None,  # int64 index of the max (first on ties)
        sum: torch.Tensor | None = None,  # Σ_k z_k
        entropy: torch.Tensor | None = None,  # −Σ_k p_k log p_k, only when asked for
        *,
        source: tuple[torch.Tensor, int] | None = None,
        finite: bool = False,
        top: torch.Tensor | None = None,  # max_k softmax(z)_k in the compute dtype
    ) -> None:
        if source is None and (argmax is None or sum is None):
            raise ValueError("RowStats needs argmax and sum, or the source (scores, class_dim) to compute them from")
        self.lse, self.max, self.entropy, self.finite, self.top = lse, max, entropy, finite, top
        self._top1: torch.Tensor | None = None
        self._argmax, self._sum, self._source = argmax, sum, source

    @property
    def top1(self) -> torch.Tensor | None:
        """max_k softmax(z)_k as float64 (None without ``top``), converted on first use."""
        if self._top1 is None and self.top is not None:
            self._top1 = self.top.to(torch.float64)
        return self._top1

    @property
    def argmax(self) -> torch.Tensor:
        """int64 index of the max score (the first on ties; a NaN counts as the max, as in torch)."""
        if self._argmax is None:
            self._argmax = _row_reduce(self._scores(), _block_argmax, torch.int64).reshape(self.lse.shape)
            self._release_source()
        return self._argmax

    @property
    def sum(self) -> torch.Tensor:
        """Σ_k z_k per row (label smoothing and the probabilities-as-logits diagnostic need it)."""
        if self._sum is None:
            self._sum = _row_reduce(self._scores(), lambda b: b.sum(dim=1), self.lse.dtype).reshape(self.lse.shape)
            self._release_source()
        return self._sum

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


def _block_argmax(z: torch.Tensor) -> torch.Tensor:
    """The first index of each row's max in a block [m, K] (a NaN counts as the max), as torch defines it.

    On CPU, float32 and float64 go through numpy's SIMD argmax: 0.11 ms for
    1M float32 scores against 1.1 ms for torch's (it was a quarter of a
    four-function [4096, 1024] request), with the same index on ties, NaN and ±inf."""
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64) and not z.requires_grad:
        return torch.from_numpy(z.numpy().argmax(axis=1))
    return z.argmax(dim=1)


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
    its own, bit for bit the one :func:`row_statistics` makes on request."""
    entropy = _row_pass(x, class_dim, True).entropy
    if entropy is None:  # asked for, so always computed: a programming error, never the caller's
        raise RuntimeError("the row pass asked for the entropy returned none")
    return entropy


def row_statistics(x: torch.Tensor, class_dim: int, with_entropy: bool) -> RowStats:
    """:class:`RowStats` of ``x`` in one pass over it: lse, max and, on CPU, the top-1 confidence (and entropy when asked for).

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
    done = _row_pass(x, class_dim, with_entropy)
    return RowStats(done.lse, done.max, entropy=done.entropy, source=(x, class_dim), finite=done.finite, top=done.top)


class _Pass(NamedTuple):
    """What one pass over scores gives: per-row max, lse, entropy (when asked for), whether every score is finite, max softmax."""

    max: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    finite: bool  # True only when proven (the CPU path); False when unknown or not
    top: torch.Tensor | None  # max_k softmax(z)_k, on the CPU path


def _row_pass(x: torch.Tensor, class_dim: int, with_entropy: bool) -> _Pass:
    """Max, lse (and entropy, and on CPU the max softmax) of every row of ``x`` over ``class_dim``, block by block, shaped as ``x`` without it."""
    dtype = compute_dtype(x.dtype)
    whole = only_block(x, class_dim)
    if whole is not None:  # one block: its results are the statistics, no buffers to copy them into
        return _block_pass(as_dtype(whole, dtype), with_entropy, None, None)
    out_shape = x.shape[:class_dim] + x.shape[class_dim + 1 :]
    rows = math.prod(out_shape)
    lse = torch.empty(rows, dtype=dtype, device=x.device)
    mx = torch.empty(rows, dtype=dtype, device=x.device)
    ent = torch.empty(rows, dtype=dtype, device=x.device) if with_entropy else None
    on_cpu = x.device.type == "cpu"
    top = torch.empty(rows, dtype=dtype) if on_cpu else None
    k = x.shape[class_dim]
    step = max(1, CACHE_BLOCK_ELEMENTS // max(1, k))  # cache_blocks' rows per block on CPU
    # Cache-sized buffers reused by every block: a fresh 4 MiB tensor per block pays its page faults each time.
    p = torch.empty((step, k), dtype=dtype) if on_cpu else None
    log_p = torch.empty((step, k), dtype=dtype) if on_cpu and with_entropy else None
    converted = torch.empty((step, k), dtype=dtype) if on_cpu and x.dtype != dtype else None
    finite = on_cpu
    for row, z in cache_blocks(x, class_dim):
        m = z.shape[0]
        z = converted[:m].copy_(z) if converted is not None else z.to(dtype)
        done = _block_pass(z, with_entropy, None if p is None else p[:m], None if log_p is None else log_p[:m])
        stop = row + m
        mx[row:stop], lse[row:stop] = done.max, done.lse
        if ent is not None and done.entropy is not None:
            ent[row:stop] = done.entropy
        if top is not None and done.top is not None:
            top[row:stop] = done.top
        finite = finite and done.finite
    return _Pass(
        mx.reshape(out_shape),
        lse.reshape(out_shape),
        None if ent is None else ent.reshape(out_shape),
        finite,
        None if top is None else top.reshape(out_shape),
    )


def _block_pass(z: torch.Tensor, with_entropy: bool, p_out: torch.Tensor | None, log_p_out: torch.Tensor | None) -> _Pass:
    """One block [m, K] in its compute dtype: on CPU the softmax path (the exp path for odd rows), elsewhere the exp path."""
    if z.device.type != "cpu":
        block = _block_logsumexp(z)
        return _Pass(block.max, block.lse, _block_entropy(z, block) if with_entropy else None, False, None)
    values = z.amax(dim=1)  # amax: max(dim) also tracks indices, 4x slower on CPU
    # A finite sum proves every row max finite (a NaN, a ±inf, or an overflow, a false alarm
    # that then finds no odd row): one scalar for the usual case.
    peaks_finite = values.numel() == 0 or math.isfinite(float(values.sum()))
    done = _cpu_block(z, values, peaks_finite, with_entropy, p_out, log_p_out)
    if peaks_finite:
        return done
    finite_max = torch.isfinite(values)
    if bool(finite_max.all()):
        return done
    # Rows with a NaN or +inf score, or all −inf, take the exp path, row by row alike whatever
    # block they fall in: the values torch defines for such rows (softmax makes them NaN, and
    # leaves their confidence NaN: never binned).
    odd = torch.nonzero(~finite_max).reshape(-1)
    rows = z.index_select(0, odd)
    block = _block_logsumexp(rows)
    done.lse.index_copy_(0, odd, block.lse)
    if done.entropy is not None:
        done.entropy.index_copy_(0, odd, _block_entropy(rows, block))
    return done


def _cpu_block(
    z: torch.Tensor,
    values: torch.Tensor,
    peaks_finite: bool,
    with_entropy: bool,
    p_out: torch.Tensor | None,
    log_p_out: torch.Tensor | None,
) -> _Pass:
    """A CPU block's lse and top-1 confidence from torch's softmax kernel (right where row maxima are finite).

    The kernel shifts, exponentiates and sums each row in one vectorized pass
    (its exp is much faster on CPU than torch.exp's), on every intra-op
    thread, and scales by 1/Σ: at the row max, whose term is e^0 = 1, the
    probability is 1/Σ itself. So one pass gives the top-1 confidence that
    monitoring and the ECE functions bin (exact for ties: 1/2 for two) and
    lse = max − log p_max, where log_softmax's lse left the confidence a
    second pass over the scores ([4096, 1024] float32 cross-entropy and
    ECE in process, one thread: 8.0-9.1 ms against 14.0-14.2 ms). The kernel computes
    each row alone, so a row's bits do not depend on its block, its batch or
    the thread count. The entropy −Σ p log p has only terms of one sign: no
    cancellation, even for logits near 1e4 in float32."""
    p = torch.softmax(z, 1) if p_out is None else torch.softmax(z, 1, out=p_out)
    top = p.amax(dim=1)
    log_top = torch.log(top)
    lse = values - log_top
    # The row maxima being finite, the min finds any −inf: every score proven finite.
    finite = peaks_finite and (z.numel() == 0 or math.isfinite(float(z.amin())))
    if not with_entropy:
        return _Pass(values, lse, None, finite, top)
    # log p = (z − max) + log p_max, clamped: p log p counts as 0 where p is 0 and log p is −inf (z = −inf).
    log_p = z - values.unsqueeze(1) if log_p_out is None else torch.sub(z, values.unsqueeze(1), out=log_p_out)
    log_p = log_p.add_(log_top.unsqueeze(1)).clamp_min_(torch.finfo(log_p.dtype).min)
    # +0.0 turns the −0.0 of a one-hot row into 0.0.
    entropy = p.mul_(log_p).sum(dim=1).neg_().add_(0.0)
    return _Pass(values, lse, entropy, finite, top)


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
    """max_k softmax(z)_k of log-space scores, float64, shaped as ``x`` without ``class_dim`` (NaN for a row whose max is not finite).

    torch's softmax in the compute dtype: the top class's term is e^0 = 1, so
    its probability is 1/Σ, and a representable confidence (1/2 for two tied
    logits) is exact, where exp(max − lse) may land an ulp off it. On CPU the
    row pass computes this softmax for its lse and keeps the confidence
    (``RowStats.top1``, these bits): :class:`lossd.kernels.batch.Batch` takes
    it from there, and makes this pass on other devices only."""
    precision = compute_dtype(x.dtype)
    whole = only_block(x, class_dim)
    if whole is not None:  # one block: no buffer to copy its rows into
        return _block_top1_confidence(whole.to(precision))
    out = torch.empty(row_count(x, class_dim), dtype=torch.float64, device=x.device)
    # Cache-sized blocks on CPU, with one buffer for all: each step then reads the cache, and no
    # intermediate of a whole chunk (16M elements, its page faults included) is made for each of them.
    k = x.shape[class_dim]
    scratch = torch.empty((max(1, CACHE_BLOCK_ELEMENTS // max(1, k)), k), dtype=precision) if x.device.type == "cpu" else None
    for first, rows in cache_blocks(x, class_dim):
        m = rows.shape[0]
        buffer = scratch[:m] if scratch is not None and m <= scratch.shape[0] else None
        out[first : first + m] = _block_top1_confidence(rows.to(precision), buffer)
    return out.reshape(x.shape[:class_dim] + x.shape[class_dim + 1 :])


def _block_top1_confidence(z: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """max_k softmax(z)_k per row of a block [m, K] in its compute dtype, as float64 [m] (``buffer``: [m, K] scratch).

    The CPU row pass's own operation (:func:`_cpu_block`), so the same bits."""
    p = torch.softmax(z, 1) if buffer is None else torch.softmax(z, 1, out=buffer)
    return p.amax(dim=1).to(torch.float64)
