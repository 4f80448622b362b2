"""Per-row logsumexp, max, argmax and Σz of [M, K] scores in one read (Triton, CUDA).

The shared row statistics behind every softmax loss, accuracy and calibration
(:class:`lossd.kernels.row_stats.RowStats`) need four reductions over the classes
of each row.  On a GPU they are bound by memory bandwidth, so this kernel reads
each score once and keeps all four as running values: an online logsumexp
(the running sum is rescaled whenever the running max grows), the first index
of the max, and Σz.  Inputs may be float16, bfloat16 or float32; everything
accumulates in float32 (float64 inputs stay on the torch path, which keeps
them in float64).

Edge values follow torch: a row of −inf has lse = max = −inf and argmax 0; a
+inf gives lse = max = +inf; a NaN gives lse = max = NaN and argmax = the first
NaN's index; Σz follows IEEE addition.

Layout: one program per row; the row is walked in BLOCK_SIZE columns at a
time, so K has no upper limit beyond int32 indexing.  Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs on
CPU tensors; that is how the unit tests check it against
:func:`row_stats_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lossd.kernels.chunks import iter_row_chunks

__all__ = ["RowStatsTensors", "row_stats_triton", "row_stats_reference", "row_statistics_triton", "SUPPORTED_DTYPES", "MAX_BLOCK_SIZE"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK_SIZE = 8192  # columns per step of a program; larger rows loop
_INT32_LIMIT = 2**31 - 1  # column offsets are int32 inside a row; the grid's x dimension is capped there too


class RowStatsTensors(NamedTuple):
    """lse, max, Σz: float32 [M]; argmax: int64 [M]."""

    lse: torch.Tensor
    max: torch.Tensor
    argmax: torch.Tensor
    sum: torch.Tensor


@triton.jit  # type: ignore[untyped-decorator]
def _row_stats_kernel(  # type: ignore[no-untyped-def]
    x_ptr,  # [M, K] scores (fp16/bf16/fp32), classes contiguous
    x_row_stride,  # int, elements between consecutive rows of x
    lse_ptr,  # [M] fp32 out: log Σ_k exp(z_k)
    max_ptr,  # [M] fp32 out: max_k z_k
    argmax_ptr,  # [M] int64 out: first k with z_k = max (first NaN, if any)
    sum_ptr,  # [M] fp32 out: Σ_k z_k
    n_cols,  # int, K
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * x_row_stride
    base = tl.arange(0, BLOCK_SIZE)

    m = float("-inf")  # running max (NaN kept out: tracked by first_nan)
    s = 0.0  # Σ exp(z − shift(m)), shift(m) = m when finite, else 0
    total = 0.0  # Σ z
    arg = 0  # first index of the running max
    first_nan = n_cols  # first NaN index; n_cols = none
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + base
        mask = cols < n_cols
        z = tl.load(x_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        nan = z != z
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan, cols, n_cols), axis=0))
        total += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(nan, float("-inf"), z)

        block_max = tl.max(z, axis=0)
        block_arg = tl.min(tl.where(z == block_max, cols, n_cols), axis=0)  # first on ties
        arg = tl.where(block_max > m, block_arg, arg)  # strictly greater: earlier blocks win ties
        m_new = tl.maximum(m, block_max)
        # Shift by the max only when it is finite: exp(−inf − −inf) would be NaN.
        shift_old = tl.where(tl.abs(m) < float("inf"), m, 0.0)
        shift_new = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        # s = 0 (all −inf so far) stays 0 even where exp(shift_old − shift_new) overflows.
        s = tl.where(s == 0.0, 0.0, s * tl.exp(shift_old - shift_new)) + tl.sum(tl.exp(z - shift_new), axis=0)
        m = m_new

    shift = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    lse = tl.log(s) + shift
    has_nan = first_nan < n_cols
    tl.store(lse_ptr + row, tl.where(has_nan, float("nan"), lse))
    tl.store(max_ptr + row, tl.where(has_nan, float("nan"), m))
    tl.store(argmax_ptr + row, tl.where(has_nan, first_nan, arg).to(tl.int64))
    tl.store(sum_ptr + row, total)


def _num_warps(block_size: int) -> int:
    """Liger-Kernel's rule of thumb: more warps for wider blocks."""
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


def _check_input(x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"row_stats_triton expects scores [M, K], got shape {list(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"row_stats_triton expects float16, bfloat16 or float32 scores (accumulated in float32), got {x.dtype}; "
            "float64 scores belong on the torch path, which keeps them in float64"
        )
    m, k = x.shape
    if k < 1:
        raise ValueError(f"row_stats_triton expects at least one class per row, got K={k}")
    if k > _INT32_LIMIT:
        raise ValueError(f"row_stats_triton indexes classes with int32: K={k} exceeds {_INT32_LIMIT}")
    if m > _INT32_LIMIT:
        raise ValueError(f"row_stats_triton launches one program per row: M={m} rows exceed the grid limit {_INT32_LIMIT}; split the rows")
    if k > 1 and x.stride(1) != 1:
        raise ValueError(
            f"row_stats_triton expects contiguous classes (stride 1 on dim 1), got strides {list(x.stride())}; pass x.contiguous()"
        )


def _block_size(k: int, block_size: int | None) -> int:
    if block_size is None:
        return max(16, min(MAX_BLOCK_SIZE, int(triton.next_power_of_2(k))))
    if block_size < 16 or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, {MAX_BLOCK_SIZE}], got {block_size}")
    return block_size


def row_stats_triton(x: torch.Tensor, *, block_size: int | None = None) -> RowStatsTensors:
    """(lse, max, argmax, Σz) of every row of ``x`` [M, K], reading it once.

    ``block_size`` (a power of two) sets how many columns a program reads per
    step; by default the next power of two of K, at most MAX_BLOCK_SIZE.
    Raises ValueError/TypeError on shapes, strides and dtypes it cannot take."""
    _check_input(x)
    m, k = x.shape
    block = _block_size(k, block_size)
    lse = torch.empty(m, dtype=torch.float32, device=x.device)
    mx = torch.empty(m, dtype=torch.float32, device=x.device)
    argmax = torch.empty(m, dtype=torch.int64, device=x.device)
    total = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _row_stats_kernel[(m,)](x, x.stride(0), lse, mx, argmax, total, k, BLOCK_SIZE=block, num_warps=_num_warps(block))
    return RowStatsTensors(lse, mx, argmax, total)


def row_stats_reference(x: torch.Tensor) -> RowStatsTensors:
    """The same four statistics with torch ops, in float32: what the kernel must match."""
    z = x.to(torch.float32)
    return RowStatsTensors(torch.logsumexp(z, dim=1), z.amax(dim=1), z.argmax(dim=1), z.sum(dim=1))


def row_statistics_triton(x: torch.Tensor, class_dim: int) -> RowStatsTensors:
    """:func:`row_stats_triton` over any layout: rows are ``x`` without ``class_dim``, shaped so.

    The rows go through the kernel a chunk at a time (:func:`iter_row_chunks`),
    so a layout that is not class-last is copied one chunk at a time, never whole."""
    out_shape = x.shape[:class_dim] + x.shape[class_dim + 1 :]
    rows = out_shape.numel()
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    mx = torch.empty(rows, dtype=torch.float32, device=x.device)
    argmax = torch.empty(rows, dtype=torch.int64, device=x.device)
    total = torch.empty(rows, dtype=torch.float32, device=x.device)
    for row, z in iter_row_chunks(x, class_dim):
        part = row_stats_triton(z if z.shape[1] <= 1 or z.stride(1) == 1 else z.contiguous())
        stop = row + z.shape[0]
        lse[row:stop], mx[row:stop], argmax[row:stop], total[row:stop] = part
    return RowStatsTensors(lse.reshape(out_shape), mx.reshape(out_shape), argmax.reshape(out_shape), total.reshape(out_shape))
