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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lossd.kernels.cancellation import check_cancelled
from lossd.kernels.errors import InvalidInput, StateLimitExceeded

__all__ = ["MergeOp", "State", "merge_fields", "merge_many", "canonical_params", "chan_merge", "moments_of", "check_state"]


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
    return merge_many([a, b], ops, concat_limit=concat_limit, path=path)


# States merged between two cancellation checks: a few ms of work for the largest ones.
MERGES_PER_CHECK = 256


def merge_many(
    states: Sequence[State],
    ops: Mapping[str, MergeOp],
    *,
    concat_limit: int | None = None,
    path: str = "states",
    each: Callable[[State], None] | None = None,
) -> State:
    """Merge states left to right: bit for bit ``merge_fields`` applied pairwise, in linear time.

    The checks and errors are those of the pairwise merge, in its order.
    CONCAT fields are gathered and concatenated once at the end (pairwise
    concatenation copies the growing buffer once per state: quadratic);
    the other fields are reduced one state at a time, so float sums keep
    their order. ``each`` is called on every state before it merges (the
    caller's own checks, in the same order)."""
    if not states:
        raise ValueError("merge_many: expected at least one state, got none")
    first = states[0]
    if each is not None:
        each(first)
    if len(states) == 1:
        return first
    merged = _Merge(first, ops, concat_limit, path)
    for i, b in enumerate(states[1:]):
        if i % MERGES_PER_CHECK == 0:
            check_cancelled()  # a cancelled call (or one past its deadline) stops here, between states
        if each is not None:
            each(b)
        merged.add(b)
    return merged.state()


class _Merge:
    """A running merge: reduced fields so far, CONCAT parts to concatenate, their rows and the batches."""

    def __init__(self, first: State, ops: Mapping[str, MergeOp], concat_limit: int | None, path: str) -> None:
        self.first, self.ops, self.concat_limit, self.path = first, ops, concat_limit, path
        self.reduced: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.rows: dict[str, int] = {}
        self.batches = first.batches

    def add(self, b: State) -> None:
        a = self.first
        if a.function != b.function:
            raise InvalidInput.single(self.path, f"cannot merge a state of {a.function!r} with one of {b.function!r}")
        if a.version != b.version:
            raise InvalidInput.single(self.path, f"state versions differ for {a.function!r}: {a.version} and {b.version}")
        if a.params != b.params:
            raise InvalidInput.single(
                self.path, f"states of {a.function!r} were computed with different parameters: {a.params} and {b.params}"
            )
        for name, op in self.ops.items():
            if name not in a.fields or name not in b.fields:
                raise InvalidInput.single(f"{self.path}.fields.{name}", f"state of {a.function!r} lacks field {name!r}")
            if op is MergeOp.CONCAT:
                self._concat(name, b.fields[name])
            else:
                self._reduce(name, op, b.fields[name])
        if self.batches + b.batches > MAX_MERGED_BATCHES:
            raise InvalidInput.single(
                f"{self.path}.batches", f"expected at most {MAX_MERGED_BATCHES} batches in all, got {self.batches + b.batches}"
            )
        self.batches += b.batches

    def _concat(self, name: str, y: torch.Tensor) -> None:
        """Check ``y`` against the buffer so far (its rows counted, not yet concatenated) and keep it for the end."""
        parts = self.parts.setdefault(name, [self.first.fields[name]])
        x = parts[0]  # the buffer so far has the first part's dtype and trailing shape
        field = f"{self.path}.fields.{name}"
        if x.dtype != y.dtype:
            raise InvalidInput.single(field, f"expected matching dtypes, got {x.dtype} and {y.dtype}")
        if x.shape[1:] != y.shape[1:]:
            so_far = (self.rows[name], *x.shape[1:]) if name in self.rows else tuple(x.shape)
            raise InvalidInput.single(field, f"expected matching trailing shapes, got {so_far} and {tuple(y.shape)}")
        total = (self.rows[name] if name in self.rows else x.shape[0]) + y.shape[0]
        if self.concat_limit is not None and total > self.concat_limit:
            raise StateLimitExceeded(
                f"{self.first.function}: the exact state would hold {total} scores, over the limit of "
                f"{self.concat_limit}; raise LOSSD_EXACT_STATE_LIMIT or pass bins=T for a binned, mergeable estimate",
                setting="exact_state_limit",
            )
        self.rows[name] = total
        parts.append(y)

    def _reduce(self, name: str, op: MergeOp, y: torch.Tensor) -> None:
        x = self.reduced.get(name, self.first.fields[name])
        field = f"{self.path}.fields.{name}"
        if x.dtype != y.dtype:
            raise InvalidInput.single(field, f"expected matching dtypes, got {x.dtype} and {y.dtype}")
        if x.shape != y.shape:
            raise InvalidInput.single(field, f"expected matching shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        if op is MergeOp.SUM:
            self.reduced[name] = x + y
        elif op is MergeOp.MAX:
            self.reduced[name] = torch.maximum(x, y)
        elif op is MergeOp.MIN:
            self.reduced[name] = torch.minimum(x, y)
        else:
            self.reduced[name] = chan_merge(x, y)

    def state(self) -> State:
        """The merged state; each CONCAT field is concatenated once, in the order its parts arrived."""
        fields = {name: torch.cat(self.parts[name], dim=0) if name in self.parts else self.reduced[name] for name in self.ops}
        return State(self.first.function, self.first.version, self.first.params, fields, self.batches)


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
# Numbers of elements, rows or items: finite, >= 0 and whole.
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
ADAPTIVE_HISTOGRAM_BINS = 1000  # calibration.bins' (imported here, a cycle): adaptive_ece's fine histogram
CONCAT_DTYPES = {"scores": torch.float64, "labels": torch.int64}  # what the exact AUROC/AP updates keep
SUM_SLACK = 1e-9  # relative: a float64 sum of n terms in [0, 1] may round past n, never by more


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
    allowed = (CONCAT_DTYPES[name],) if op is MergeOp.CONCAT and name in CONCAT_DTYPES else allowed
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
        # n sums weights: a NaN one (nan_policy='propagate') makes it NaN, an infinite one makes M2 non-finite too.
        if bool(((torch.isinf(n) & torch.isfinite(m2)) | (n < 0)).any()):
            raise InvalidInput.single(field, "expected non-negative counts n in moments[..., 0], infinite only beside a non-finite M2")
        if bool((m2 < 0).any()):
            raise InvalidInput.single(field, "expected non-negative sums of squares M2 in moments[..., 2]")
    if name in COUNT_FIELDS and (bad := _bad_count(t, whole=True)) is not None:
        raise InvalidInput.single(field, f"expected finite, non-negative whole counts, got {bad}")
    if name in NONNEGATIVE_FIELDS and bool((t < 0).any()):
        raise InvalidInput.single(field, f"expected non-negative sums, got {_bad_count(t)}")


def _bad_count(t: torch.Tensor, whole: bool = False) -> str | None:
    """The first value that is not a finite, non-negative (whole) count, for the message (never the whole tensor)."""
    flat = t.reshape(-1).to(torch.float64)
    bad = ~torch.isfinite(flat) | (flat < 0)
    found = flat[bad | (flat != torch.round(flat)) if whole else bad]
    return f"{float(found[0])!r}" if found.numel() else None


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
    _expect_shape(fields, "histogram", (ADAPTIVE_HISTOGRAM_BINS, 3), path, "adaptive_ece's fixed fine bins")
    for name in [name for name in ("bins", "histogram") if name in fields]:
        _check_bin_sums(fields[name], f"{path}.fields.{name}")
    _check_sums_agree(fields, path)
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


def _check_bin_sums(t: torch.Tensor, field: str) -> None:
    """(n, Σ confidence, Σ correct) per bin: n whole (it counts rows, NaN inputs or not), each sum in [0, n] or NaN."""
    bad = _bad_count(t[..., 0], whole=True) if t.ndim and t.shape[-1] == 3 else f"shape {list(t.shape)}"
    if bad is not None:
        raise InvalidInput.single(field, f"expected finite whole counts n in [..., 0] of (n, Σ confidence, Σ correct), got {bad}")
    over = t[..., 1:] > t[..., :1] * (1 + SUM_SLACK)  # confidences and correctness are each in [0, 1]
    if bool(over.any()):
        at = [int(i) for i in torch.nonzero(over)[0][:-1]]
        got = t[tuple(at)].tolist()
        raise InvalidInput.single(field, f"expected Σ confidence and Σ correct in [0, n], got (n, Σ conf, Σ correct) = {got} in bin {at}")


def _check_sums_agree(fields: Mapping[str, torch.Tensor], path: str) -> None:
    """Sums bounded by counts of the same state (or by each other) stay within them."""
    count, at = fields.get("count"), f"{path}.fields."
    nonzero = int((fields["matrix"] != 0).sum()) if "matrix" in fields else 0
    if count is not None and nonzero > float(count):  # each non-zero cell holds an element of non-zero weight
        raise InvalidInput.single(at + "matrix", f"expected at most count={float(count):g} non-zero cells, got {nonzero}")
    weight, total = fields.get("weight"), fields.get("total")
    if weight is not None and total is not None and bool(torch.isposinf(weight).any() & torch.isfinite(total).all()):
        # A real infinite weight makes Σ w·ℓ infinite or NaN too (nan_policy='propagate'); a finite total beside it is forged.
        raise InvalidInput.single(at + "weight", "expected a finite weight beside a finite total, got inf")
    exact, updates = fields.get("exact"), fields.get("nonempty_updates")
    if exact is not None and updates is not None and "histogram" in fields:  # adaptive_ece: each update of rows adds 1
        rows, n = float(fields["histogram"][:, 0].sum()), float(updates)
        if not min(rows, 1.0) <= n <= rows:
            raise InvalidInput.single(at + "nonempty_updates", f"expected {min(rows, 1.0):g} to {rows:g} (histogram rows), got {n:g}")
        if bool(exact > n * (1 + SUM_SLACK)):
            raise InvalidInput.single(at + "exact", f"expected at most nonempty_updates={n:g} (ECEs ≤ 1), got {float(exact)!r}")


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
    if scores is not None and "labels" in fields:
        _check_labels(fields["labels"], scores, f"{path}.fields.labels")
    if "positives" not in fields or "negatives" not in fields:
        return
    pos, neg = fields["positives"], fields["negatives"]
    bins = params.get("bins")
    if bins is None:
        _expect_shape(fields, "positives", (0,), path, "empty for an exact state (bins=None)")
        _expect_shape(fields, "negatives", (0,), path, "empty for an exact state (bins=None)")
        if scores is not None and "nan_rows" in fields:  # an exact state counts the rows it keeps with a NaN score
            nan = int(torch.isnan(scores if scores.ndim == 2 else scores[:, None]).any(1).sum())
            if float(fields["nan_rows"]) != nan:
                raise InvalidInput.single(f"{path}.fields.nan_rows", f"expected {nan} (rows with NaN), got {float(fields['nan_rows'])!r}")
        return
    if pos.shape != neg.shape or pos.ndim not in (1, 2) or pos.shape[-1] != bins or any(rows.values()):
        raise InvalidInput.single(
            f"{path}.fields.positives",
            f"expected positives and negatives of shape [bins={bins}] or [K, bins] and empty score buffers, "
            f"got {list(pos.shape)}, {list(neg.shape)} and rows {rows}",
        )


def _check_labels(labels: torch.Tensor, scores: torch.Tensor, field: str) -> None:
    """Exact AUROC/AP labels: class indices in [0, K) for scores [N, K], {0, 1} for binary scores [N]."""
    k = int(scores.shape[1]) if scores.ndim == 2 else 2
    bad = (labels < 0) | (labels >= k)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0][0])
        want = f"class indices in [0, {k}) for scores of shape [N, {k}]" if scores.ndim == 2 else "labels in {0, 1} for binary scores [N]"
        raise InvalidInput.single(field, f"expected {want}, got {int(labels[i])} at index {i}")
