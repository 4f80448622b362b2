"""Mergeable states: the sufficient statistics behind every value lossd returns.

A :class:`State` is a small dictionary of float64/int64 tensors plus the
identity that decides what may be merged with what (function name, state
version and the resolved parameters).  How each field merges is declared by
the function (:class:`MergeOp`), so merging is one generic, associative and
commutative operation everywhere: chunks of a request, batches of a stream,
ranks of a job, files written by shards.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lossd.kernels.errors import InvalidInput, StateLimitExceeded

__all__ = ["MergeOp", "State", "merge_fields", "canonical_params", "chan_merge", "moments_of"]


class MergeOp(enum.Enum):
    """How one state field combines with the same field of another state."""

    SUM = "sum"  # counts, sums, histograms
    MAX = "max"
    MIN = "min"
    CONCAT = "concat"  # exact score buffers (bounded by a server limit), concatenated on dim 0
    MOMENTS = "moments"  # [..., 3] = (n, mean, M2), merged with Chan et al.'s parallel formula


def chan_merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge (n, mean, M2) moment triples along the last dimension (Chan, Golub, LeVeque 1979)."""
    na, ma, m2a = a[..., 0], a[..., 1], a[..., 2]
    nb, mb, m2b = b[..., 0], b[..., 1], b[..., 2]
    n = na + nb
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = mb - ma
    mean = torch.where(n > 0, ma + delta * nb / safe_n, torch.zeros_like(n))
    m2 = m2a + m2b + delta * delta * na * nb / safe_n
    return torch.stack([n, mean, torch.where(n > 0, m2, torch.zeros_like(n))], dim=-1)


def moments_of(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """(n, mean, M2) of ``x`` along ``dim`` in float64: the MOMENTS field layout."""
    x = x.to(torch.float64)
    if x.shape[dim] == 0:
        return torch.zeros(x.select(dim, 0).shape + (3,), dtype=torch.float64, device=x.device)
    mean = x.mean(dim=dim)
    m2 = ((x - mean.unsqueeze(dim)) ** 2).sum(dim=dim)
    return torch.stack([torch.full_like(mean, float(x.shape[dim])), mean, m2], dim=-1)


def canonical_params(params: Mapping[str, Any]) -> str:
    """A stable JSON text of resolved parameters: two states merge only if these are equal."""
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}, sort_keys=True, separators=(",", ":"))


@dataclass
class State:
    """Sufficient statistics of one function over the data seen so far.

    ``fields`` maps names to CPU tensors (float64 or int64).  ``batches`` counts
    the updates merged in, so a reader can tell one big batch from many.
    """

    function: str
    version: int
    params: str  # canonical_params(...) of the resolved parameters
    fields: dict[str, torch.Tensor]
    batches: int = 1

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Fields as numpy arrays, for serialization."""
        return {k: v.detach().cpu().numpy() for k, v in self.fields.items()}

    @classmethod
    def from_arrays(cls, function: str, version: int, params: str, arrays: Mapping[str, np.ndarray], batches: int = 1) -> State:
        return cls(function, version, params, {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}, batches)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())


def merge_fields(
    a: State,
    b: State,
    ops: Mapping[str, MergeOp],
    *,
    concat_limit: int | None = None,
    path: str = "states",
) -> State:
    """Merge two states of the same function, version and parameters."""
    if a.function != b.function:
        raise InvalidInput.single(path, f"cannot merge a state of {a.function!r} with one of {b.function!r}")
    if a.version != b.version:
        raise InvalidInput.single(path, f"state versions differ for {a.function!r}: {a.version} and {b.version}")
    if a.params != b.params:
        raise InvalidInput.single(path, f"states of {a.function!r} were computed with different parameters: {a.params} and {b.params}")
    merged: dict[str, torch.Tensor] = {}
    for name, op in ops.items():
        if name not in a.fields or name not in b.fields:
            raise InvalidInput.single(f"{path}.fields.{name}", f"state of {a.function!r} lacks field {name!r}")
        x, y = a.fields[name], b.fields[name]
        if op is MergeOp.CONCAT:
            if x.shape[1:] != y.shape[1:]:
                raise InvalidInput.single(
                    f"{path}.fields.{name}", f"expected matching trailing shapes, got {tuple(x.shape)} and {tuple(y.shape)}"
                )
            if concat_limit is not None and x.shape[0] + y.shape[0] > concat_limit:
                raise StateLimitExceeded(
                    f"{a.function}: the exact state would hold {x.shape[0] + y.shape[0]} scores, over the limit of "
                    f"{concat_limit}; raise LOSSD_EXACT_STATE_LIMIT or pass bins=T for a binned, mergeable estimate",
                    setting="exact_state_limit",
                )
            merged[name] = torch.cat([x, y], dim=0)
            continue
        if x.shape != y.shape:
            raise InvalidInput.single(f"{path}.fields.{name}", f"expected matching shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        if op is MergeOp.SUM:
            merged[name] = x + y
        elif op is MergeOp.MAX:
            merged[name] = torch.maximum(x, y)
        elif op is MergeOp.MIN:
            merged[name] = torch.minimum(x, y)
        else:
            merged[name] = chan_merge(x, y)
    return State(a.function, a.version, a.params, merged, a.batches + b.batches)
