"""The inputs and shared pieces of the embedding losses: checked matrices and labels, similarity blocks.

Similarity matrices are built a block of anchor rows at a time (about
``CHUNK_ELEMENTS`` entries per block), so that a CLIP-sized batch never
materializes its whole N x N matrix; :class:`LogitScale` watches the scaled
similarities for the ``extreme_temperature`` diagnostic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from lossd.kernels.chunks import CHUNK_ELEMENTS
from lossd.kernels.view import View

__all__ = [
    "EXTREME_LOGIT",
    "LogitScale",
    "binary01",
    "common_dtype",
    "masked_lse",
    "matrix",
    "not_self",
    "pair_labels",
    "pair_masks",
    "row_blocks",
    "row_labels",
    "same_shape",
    "temperature",
]

EXTREME_LOGIT = 1e3


def pair_labels(n: int) -> np.ndarray:
    """Example labels 0, 0, 1, 1, 2, 2, 0, ...: every batch of 3+ rows holds a positive and a negative pair."""
    return (np.arange(n) // 2) % 3


# -- inputs -----------------------------------------------------------------
def matrix(view: View, role: str) -> torch.Tensor:
    """A float [N, D] tensor with N >= 1 and D >= 1, as sent."""
    x = view.scores(role)
    view.expect_ndim(role, x, (2,), "[N, D]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise view.error(role, f"expected at least one row and one column, got shape {list(x.shape)}")
    return x


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def same_shape(view: View, role: str, t: torch.Tensor, like: torch.Tensor, like_role: str) -> None:
    """Refuse a role whose shape differs from ``like_role``'s."""
    if tuple(t.shape) != tuple(like.shape):
        raise view.error(role, f"expected the shape of {view.tensor_name(like_role)} {list(like.shape)}, got {list(t.shape)}")


def row_labels(view: View, n: int) -> torch.Tensor:
    """The ``labels`` role as int64 [n], one label per row."""
    y = view.index_labels("labels")
    if tuple(y.shape) != (n,):
        raise view.error("labels", f"expected shape [{n}] (one label per embedding row), got {list(y.shape)}")
    return y


def binary01(view: View, role: str, n: int) -> torch.Tensor:
    """A [n] tensor of exact 0/1 values (bool, integer or float), as float."""
    t = view.tensor(role)
    if tuple(t.shape) != (n,):
        raise view.error(role, f"expected shape [{n}], got {list(t.shape)}")
    t = t.to(torch.float64)
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0][0])
        raise view.error(role, f"expected values in {{0, 1}}, got {float(t[first])!r} at index {first}")
    return t


# -- shared pieces ------------------------------------------------------------
def row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Slices of anchor rows whose [rows, n_cols] similarity block holds about CHUNK_ELEMENTS entries."""
    step = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def not_self(block: slice, n: int, device: torch.device) -> torch.Tensor:
    """[rows, n] mask that is False where a row meets itself (column index == row index)."""
    rows = torch.arange(block.start, block.stop, device=device)
    return rows[:, None] != torch.arange(n, device=device)[None, :]


def masked_lse(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row logsumexp over the kept entries; −inf for a row that keeps none."""
    return torch.logsumexp(x.masked_fill(~keep, -math.inf), dim=1)


class LogitScale:
    """Tracks the largest |logit| seen, for the extreme_temperature diagnostic."""

    def __init__(self) -> None:
        self.max = 0.0

    def see(self, logits: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        a = logits.abs() if keep is None else logits.abs().masked_fill(~keep, 0)
        if a.numel():
            self.max = max(self.max, float(a.max()))

    def report(self, view: View, what: str) -> None:
        if self.max > EXTREME_LOGIT:
            view.diag(
                "extreme_temperature",
                f"{what} reach |{self.max:.3g}| > {EXTREME_LOGIT:g}: the softmax saturates and the loss is dominated by "
                "single pairs; check the temperature/scale and whether embeddings are normalized",
            )


def temperature(p: Mapping[str, Any]) -> float:
    """The ``temperature`` parameter as a float."""
    return float(p["temperature"])


def pair_masks(y: torch.Tensor, block: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) of a block of anchors: same label other row, different label."""
    same = y[block, None] == y[None, :]
    return same & not_self(block, y.shape[0], y.device), ~same
