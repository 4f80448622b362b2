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

__all__ = ["MergeOp", "State", "merge_fields", "canonical_params", "chan_merge", "moments_of", "check_state"]


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
        if x.dtype != y.dtype:
            raise InvalidInput.single(f"{path}.fields.{name}", f"expected matching dtypes, got {x.dtype} and {y.dtype}")
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
    if a.batches + b.batches > MAX_MERGED_BATCHES:
        raise InvalidInput.single(f"{path}.batches", f"expected at most {MAX_MERGED_BATCHES} batches in all, got {a.batches + b.batches}")
    return State(a.function, a.version, a.params, merged, a.batches + b.batches)


# -- validation of states that come from outside (prior_states, Finalize) -------------------------
#
# A state from a client is data, not a promise: it is checked against what its
# function declares (field names and merge ops) and against the layout the
# catalogue's updates produce, before anything merges or finalizes it.  The
# layout rules are keyed by field name because the catalogue shares its field
# names (``total``/``weight``/``count`` in every mean, ``matrix`` in every
# confusion state, ``bins`` in every calibration state); a function whose
# field has a name below gets its rule.

# Fields that hold one number in every function that has them (and every ``sum_*``).
SCALAR_FIELDS = frozenset(
    {
        "total",
        "weight",
        "count",
        "rows",
        "elements",
        "tokens",
        "sequences",
        "sequence_total",
        "empty_sequences",
        "nll_at_1",
        "exact",
        "nonempty_updates",
        "nan_rows",
        "weight_kl",
        "single_row_batches",
        "no_positive_batches",
        "no_negative_batches",
    }
)
# Numbers of elements, rows or items: finite and >= 0.
COUNT_FIELDS = frozenset(
    {"count", "rows", "elements", "tokens", "sequences", "empty_sequences", "nonempty_updates", "nan_rows", "positives", "negatives"}
    | {"single_row_batches", "no_positive_batches", "no_negative_batches"}
)
# Sums of non-negative terms (weights, probabilities, weighted counts, indicator sums): >= 0.
# NaN stays allowed: a NaN input propagates into these sums (and into the values) by design.
NONNEGATIVE_FIELDS = frozenset(
    {"weight", "weight_kl", "matrix", "bins", "histogram", "routed", "router_prob", "sum_clip_fraction", "sum_reward_accuracy", "exact"}
)
# The confusion state is K×K; the updates refuse K over this (see metrics.classification).
MAX_STATE_CLASSES = 4096
MAX_STATE_NDIM = 4
MAX_STATE_BATCHES = 2**40  # one state's batches; merged ones add up and travel as uint64
MAX_MERGED_BATCHES = 2**62


def check_state(state: State, declared: Mapping[str, MergeOp], params: Mapping[str, Any], path: str) -> None:
    """Refuse a state whose fields disagree with its function's declaration or with its parameters.

    ``declared`` is the function's field -> MergeOp mapping and ``params`` the
    state's resolved parameters; ``path`` prefixes field names in errors
    (``prior_states.ce``, ``states[0].state``)."""
    names, expected = set(state.fields), set(declared)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise InvalidInput.single(
            f"{path}.fields", f"expected the fields {sorted(expected)} of a {state.function} state, got {', '.join(parts)}"
        )
    if not 1 <= state.batches <= MAX_STATE_BATCHES:
        raise InvalidInput.single(f"{path}.batches", f"expected a batch count in [1, 2^40], got {state.batches}")
    for name, op in declared.items():
        _check_field(state.fields[name], name, op, f"{path}.fields.{name}")
    _check_layout(state.fields, declared, params, path)


def _check_field(t: torch.Tensor, name: str, op: MergeOp, field: str) -> None:
    allowed = (torch.float64, torch.int64) if op is MergeOp.CONCAT else (torch.float64,)
    if t.dtype not in allowed:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidInput.single(field, f"expected dtype {wanted}, got {str(t.dtype).removeprefix('torch.')}")
    if t.ndim > MAX_STATE_NDIM:
        raise InvalidInput.single(field, f"expected at most {MAX_STATE_NDIM} dimensions, got shape {list(t.shape)}")
    if (name in SCALAR_FIELDS or name.startswith("sum_")) and t.ndim != 0:
        raise InvalidInput.single(field, f"expected a scalar, got shape {list(t.shape)}")
    if op is MergeOp.MOMENTS:
        if t.ndim == 0 or t.shape[-1] != 3:
            raise InvalidInput.single(field, f"expected moments of shape [..., 3] = (n, mean, M2), got shape {list(t.shape)}")
        n, m2 = t[..., 0], t[..., 2]
        if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
            raise InvalidInput.single(field, "expected finite, non-negative counts n in moments[..., 0]")
        if bool((m2 < 0).any()):
            raise InvalidInput.single(field, "expected non-negative sums of squares M2 in moments[..., 2]")
    if name in COUNT_FIELDS and (not bool(torch.isfinite(t).all()) or bool((t < 0).any())):
        raise InvalidInput.single(field, f"expected finite, non-negative counts, got {_extreme(t)}")
    if name in NONNEGATIVE_FIELDS and bool((t < 0).any()):
        raise InvalidInput.single(field, f"expected non-negative sums, got {_extreme(t)}")


def _extreme(t: torch.Tensor) -> str:
    """The value that breaks a count rule, for the message (never the whole tensor)."""
    flat = t.reshape(-1).to(torch.float64)
    bad = flat[~torch.isfinite(flat) | (flat < 0)]
    return f"{float(bad[0])!r}" if bad.numel() else "none"


def _expect_shape(fields: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], path: str, what: str) -> None:
    if name in fields and tuple(fields[name].shape) != shape:
        raise InvalidInput.single(f"{path}.fields.{name}", f"expected shape {list(shape)} ({what}), got {list(fields[name].shape)}")


def _check_layout(fields: Mapping[str, torch.Tensor], declared: Mapping[str, MergeOp], params: Mapping[str, Any], path: str) -> None:
    """Shapes that must agree with the parameters and with each other."""
    if "matrix" in fields:
        m = fields["matrix"]
        if m.ndim != 2 or m.shape[0] != m.shape[1] or not 1 <= m.shape[0] <= MAX_STATE_CLASSES:
            raise InvalidInput.single(
                f"{path}.fields.matrix", f"expected a K×K confusion matrix with 1 <= K <= {MAX_STATE_CLASSES}, got shape {list(m.shape)}"
            )
    n_bins = params.get("n_bins")
    if "bins" in fields and isinstance(n_bins, int):
        b = fields["bins"]
        classwise = params.get("scope") == "classwise"
        want = "[K, n_bins, 3] (scope='classwise')" if classwise else "[n_bins, 3]"
        if b.ndim != (3 if classwise else 2) or tuple(b.shape[-2:]) != (n_bins, 3):
            raise InvalidInput.single(f"{path}.fields.bins", f"expected shape {want} with n_bins={n_bins}, got {list(b.shape)}")
    if "histogram" in fields and (fields["histogram"].ndim != 2 or fields["histogram"].shape[-1] != 3):
        raise InvalidInput.single(f"{path}.fields.histogram", f"expected shape [H, 3], got {list(fields['histogram'].shape)}")
    for name in ("bins", "histogram"):  # (n, Σ confidence, Σ correct) per bin: n counts rows, NaN inputs or not
        if name in fields and not bool(torch.isfinite(fields[name][..., 0]).all()):
            raise InvalidInput.single(f"{path}.fields.{name}", "expected finite counts n in [..., 0] of (n, Σ confidence, Σ correct)")
    grid = params.get("grid_points")
    if isinstance(grid, int):
        _expect_shape(fields, "nll", (grid,), path, f"grid_points={grid}")
    elif "nll" in fields:
        _expect_shape(fields, "nll", (), path, "a sum over tokens")
    top_k = params.get("top_k")
    if "routed" in fields and isinstance(top_k, int):
        r = fields["routed"]
        if r.ndim != 2 or r.shape[0] != top_k:
            raise InvalidInput.single(f"{path}.fields.routed", f"expected shape [top_k={top_k}, E], got {list(r.shape)}")
        _expect_shape(fields, "router_prob", (r.shape[1],), path, "one per expert of routed")
    _check_moments_layout(fields, declared, path)
    _check_rank_layout(fields, declared, params, path)


def _check_moments_layout(fields: Mapping[str, torch.Tensor], declared: Mapping[str, MergeOp], path: str) -> None:
    """Per-column statistics (r2, rmse): every non-scalar field has the columns of the moments."""
    moments = [name for name, op in declared.items() if op is MergeOp.MOMENTS]
    if not moments:
        return
    columns = tuple(fields[moments[0]].shape[:-1])
    for name in moments:
        _expect_shape(fields, name, (*columns, 3), path, f"the columns of {moments[0]}")
    for name, op in declared.items():
        if op is not MergeOp.MOMENTS and name not in SCALAR_FIELDS:
            _expect_shape(fields, name, columns, path, f"one per column of {moments[0]}")


def _check_rank_layout(fields: Mapping[str, torch.Tensor], declared: Mapping[str, MergeOp], params: Mapping[str, Any], path: str) -> None:
    """Exact score buffers (CONCAT) agree in rows; binned histograms have the declared bins."""
    concat = [name for name, op in declared.items() if op is MergeOp.CONCAT]
    if not concat:
        return
    rows = {name: int(fields[name].shape[0]) if fields[name].ndim else -1 for name in concat}
    if len(set(rows.values())) != 1 or -1 in rows.values():
        raise InvalidInput.single(f"{path}.fields", f"expected exact-state buffers with one row per score each, got rows {rows}")
    scores = fields.get("scores")
    if scores is not None and scores.ndim not in (1, 2):
        raise InvalidInput.single(f"{path}.fields.scores", f"expected shape [N] or [N, K], got {list(scores.shape)}")
    if "labels" in fields and fields["labels"].ndim != 1:
        raise InvalidInput.single(f"{path}.fields.labels", f"expected shape [N], got {list(fields['labels'].shape)}")
    if "positives" not in fields or "negatives" not in fields:
        return
    pos, neg = fields["positives"], fields["negatives"]
    bins = params.get("bins")
    if bins is None:
        _expect_shape(fields, "positives", (0,), path, "empty for an exact state (bins=None)")
        _expect_shape(fields, "negatives", (0,), path, "empty for an exact state (bins=None)")
        return
    if pos.shape != neg.shape or pos.ndim not in (1, 2) or pos.shape[-1] != bins or any(rows.values()):
        raise InvalidInput.single(
            f"{path}.fields.positives",
            f"expected positives and negatives of shape [bins={bins}] or [K, bins] and empty score buffers, "
            f"got {list(pos.shape)}, {list(neg.shape)} and rows {rows}",
        )
