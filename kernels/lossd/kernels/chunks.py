"""Chunking: walk a score tensor's rows in blocks of bounded size.

No intermediate of the size of a whole logits tensor is ever made: every pass
over scores reads them a chunk (about 64 MiB of float32) at a time, and on CPU
a chunk is cut further into cache-sized blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lossd.kernels.cancellation import check_cancelled

__all__ = [
    "CHUNK_ELEMENTS",
    "CACHE_BLOCK_ELEMENTS",
    "iter_class_last_chunks",
    "iter_row_chunks",
    "cache_blocks",
    "only_block",
    "row_count",
]

# Rows are processed in chunks of about this many elements (64 MiB of float32)
# so that no intermediate of the size of the whole logits tensor is ever made.
CHUNK_ELEMENTS = 1 << 24

# On CPU, the row statistics work on blocks of about this many elements of a
# chunk (4 MiB of float32), so that the exp temporary stays in the last-level
# cache. Measured on [512, 32768] float32: 3x faster than whole 64 MiB chunks;
# blocks 4x smaller are no faster and pay 4x the per-op (thread barrier) costs.
CACHE_BLOCK_ELEMENTS = 1 << 20


def iter_class_last_chunks(x: torch.Tensor, class_dim: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, rows) with rows = x[start:stop] moved to class-last and flattened to [m, K].

    Chunks run over dim 0; a [N, K] tensor is chunked without copies."""
    n = x.shape[0]
    per_item = max(1, math.prod(x.shape[1:]))
    step = max(1, CHUNK_ELEMENTS // per_item)
    k = x.shape[class_dim]
    for start in range(0, n, step):
        check_cancelled()  # a cancelled call (or one past its deadline) stops here, between chunks
        part = x[start : start + step]
        if class_dim != part.ndim - 1:
            part = part.movedim(class_dim, -1)
        yield start, min(n, start + step), part.reshape(-1, k)


def iter_row_chunks(x: torch.Tensor, class_dim: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_row, rows) with rows a [m, K] class-last block of at most about CHUNK_ELEMENTS elements.

    Rows are numbered in the row-major order of ``x`` without its class
    dimension.  Unlike :func:`iter_class_last_chunks`, a dim-0 slice larger
    than a chunk is split further along the next dimensions, so that an LLM
    batch [B, T, V] is processed a few hundred tokens at a time instead of a
    whole sequence at a time.  Blocks of a class-last tensor are views; other
    layouts copy one block at a time, never the whole tensor."""
    k = x.shape[class_dim]
    budget = max(1, CHUNK_ELEMENTS // max(1, k))  # rows per block
    if x.ndim == 2 and class_dim == 1 and x.shape[0] <= budget:
        # [N, K] of one chunk, the common small request: the block is x itself (no view ops to pay).
        check_cancelled()
        yield 0, x
        return
    yield from _row_blocks(x.movedim(class_dim, -1), budget, 0)


def _row_blocks(v: torch.Tensor, budget: int, first: int) -> Iterator[tuple[int, torch.Tensor]]:
    # v is [a0, a1, ..., K]: split a0 into slices of whole items when an item fits the budget,
    # otherwise recurse into each item.
    k = v.shape[-1]
    if v.ndim == 1:
        yield first, v.reshape(1, k)
        return
    per_item = math.prod(v.shape[1:-1])
    n = v.shape[0]
    if per_item <= budget:
        step = max(1, budget // max(1, per_item))
        for start in range(0, n, step):
            check_cancelled()  # a cancelled call (or one past its deadline) stops here, between chunks
            part = v[start : start + step]
            yield first + start * per_item, part.reshape(part.shape[0] * per_item, k)
        return
    for i in range(n):
        yield from _row_blocks(v[i], budget, first + i * per_item)


def cache_blocks(x: torch.Tensor, class_dim: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first_row, rows [m, K]) over ``x``: :func:`iter_row_chunks`, cut into cache-sized blocks on CPU.

    On CPU every elementwise step of a block then reads and writes the cache
    instead of memory.  Other devices get the chunks whole: there, a launch
    per small block would cost more than it saves."""
    k = max(1, x.shape[class_dim])
    step = max(1, CACHE_BLOCK_ELEMENTS // k)
    for row, z in iter_row_chunks(x, class_dim):
        if x.device.type != "cpu" or z.shape[0] <= step:
            yield row, z
            continue
        for start in range(0, z.shape[0], step):
            yield row + start, z[start : start + step]


def only_block(x: torch.Tensor, class_dim: int) -> torch.Tensor | None:
    """``x`` itself when :func:`cache_blocks` would yield it as its only block (an [N, K] tensor that fits one), else None.

    A pass over such a tensor needs no block loop and no output buffer to
    copy each block's rows into: the ops a small request would pay for
    nothing.  Like the block loops, it checks for cancellation first."""
    if x.ndim != 2 or class_dim != 1:
        return None
    limit = CACHE_BLOCK_ELEMENTS if x.device.type == "cpu" else CHUNK_ELEMENTS  # cache blocks are smaller than chunks
    if x.shape[0] > max(1, limit // max(1, x.shape[1])):
        return None
    check_cancelled()
    return x


def row_count(x: torch.Tensor, class_dim: int) -> int:
    """How many rows ``x`` has over ``class_dim``: the product of its other dimensions."""
    return math.prod(x.shape[:class_dim] + x.shape[class_dim + 1 :])
