"""The evaluation plan: one request's tensors, shared intermediates and findings.

A :class:`Batch` holds the request's tensors (already on the compute device)
and memoizes intermediates that several functions need, so that asking for
cross-entropy, accuracy, ECE and entropy of the same logits makes one pass
over them: per-row logsumexp, max, argmax and sum (and, on demand, the
predictive entropy).  Each function sees the batch through a :class:`View`
that maps its roles to tensor names and reports errors and diagnostics with
the right field names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lossd.kernels.diagnostics import Diagnostics
from lossd.kernels.errors import InvalidInput
from lossd.kernels.registry import FunctionDef

__all__ = ["Batch", "View", "RowStats", "compute_dtype", "CHUNK_ELEMENTS"]

# Rows are processed in chunks of about this many elements (64 MiB of float32)
# so that no intermediate of the size of the whole logits tensor is ever made.
CHUNK_ELEMENTS = 1 << 24

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 inputs are computed in fp32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class RowStats:
    """Per-row statistics of a score tensor over its class dimension.

    Shapes are the input's shape without the class dimension; values are in
    the compute dtype (fp32, or fp64 for fp64 inputs)."""

    lse: torch.Tensor  # logsumexp over classes
    max: torch.Tensor  # max score
    argmax: torch.Tensor  # int64 index of the max (first on ties)
    sum: torch.Tensor  # Σ_k z_k
    entropy: torch.Tensor | None = None  # −Σ_k p_k log p_k, only when asked for

    @property
    def top1_confidence(self) -> torch.Tensor:
        """max_k softmax(z)_k = exp(max − lse), without materializing softmax."""
        return torch.exp(self.max - self.lse)


def iter_class_last_chunks(x: torch.Tensor, class_dim: int):  # type: ignore[no-untyped-def]
    """Yield (start, stop, rows) with rows = x[start:stop] moved to class-last and flattened to [m, K].

    Chunks run over dim 0; a [N, K] tensor is chunked without copies."""
    n = x.shape[0]
    per_item = max(1, math.prod(x.shape[1:]))
    step = max(1, CHUNK_ELEMENTS // per_item)
    k = x.shape[class_dim]
    for start in range(0, n, step):
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
            part = v[start : start + step]
            yield first + start * per_item, part.reshape(part.shape[0] * per_item, k)
        return
    for i in range(n):
        yield from _row_blocks(v[i], budget, first + i * per_item)


def count_nonfinite(t: torch.Tensor) -> tuple[int, bool]:
    """(number of NaN/inf values, whether a float16 tensor holds |value| >= 65504), block by block.

    ``torch.isfinite`` builds |t| and two boolean tensors of the full size, and
    ``t.sum(dtype=float32)`` of a half tensor casts all of it first; done in
    blocks, the check costs O(CHUNK_ELEMENTS) extra memory."""
    half = t.dtype == torch.float16
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if not t.is_contiguous():  # rare (a strided view): check it whole
        return int((~torch.isfinite(t)).sum()), half and bool((t.abs() >= 65504).any())
    flat = t.reshape(-1)
    bad, at_limit = 0, False
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        block = flat[start : start + CHUNK_ELEMENTS]
        # Fast path: a finite sum proves every element finite (NaN and inf propagate);
        # a non-finite one (possibly mere overflow) falls through to the exact count.
        if not bool(torch.isfinite(block.sum(dtype=acc))):
            bad += int((~torch.isfinite(block)).sum())
        if half and not at_limit:  # max and min, not |block|: no copy
            at_limit = bool(block.max() >= 65504) or bool(block.min() <= -65504)
    return bad, at_limit


def row_statistics(x: torch.Tensor, class_dim: int, with_entropy: bool) -> RowStats:
    """One chunked pass over ``x`` computing :class:`RowStats`."""
    dtype = compute_dtype(x.dtype)
    out_shape = x.shape[:class_dim] + x.shape[class_dim + 1 :]
    rows = math.prod(out_shape)
    lse = torch.empty(rows, dtype=dtype, device=x.device)
    mx = torch.empty(rows, dtype=dtype, device=x.device)
    am = torch.empty(rows, dtype=torch.int64, device=x.device)
    sm = torch.empty(rows, dtype=dtype, device=x.device)
    ent = torch.empty(rows, dtype=dtype, device=x.device) if with_entropy else None
    for row, z in iter_row_chunks(x, class_dim):
        z = z.to(dtype)
        m = z.shape[0]
        values, index = z.max(dim=1)
        # logsumexp from the max already taken: about 3x faster than torch.logsumexp
        # on CPU, same values. Rows of all −inf give lse = −inf, as logsumexp does.
        safe = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
        chunk_lse = (z - safe[:, None]).exp_().sum(dim=1).log_().add_(safe)
        lse[row : row + m] = chunk_lse
        mx[row : row + m] = values
        am[row : row + m] = index
        sm[row : row + m] = z.sum(dim=1)
        if ent is not None:
            # H = lse − Σ p z; p·z is taken as 0 where p underflows to 0 (z = −inf included).
            p = torch.exp(z - chunk_lse[:, None])
            pz = torch.where(p > 0, p * z, torch.zeros_like(p))
            ent[row : row + m] = chunk_lse - pz.sum(dim=1)
    return RowStats(
        lse.reshape(out_shape),
        mx.reshape(out_shape),
        am.reshape(out_shape),
        sm.reshape(out_shape),
        None if ent is None else ent.reshape(out_shape),
    )


@dataclass
class Batch:
    """One request's tensors on the compute device, with memoized intermediates."""

    tensors: Mapping[str, torch.Tensor]
    device: torch.device
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    settings: Mapping[str, Any] = field(default_factory=dict)
    _row_stats: dict[tuple[str, int], RowStats] = field(default_factory=dict)
    _checked_finite: set[str] = field(default_factory=set)

    def row_stats(self, tensor_name: str, class_dim: int, *, with_entropy: bool = False) -> RowStats:
        key = (tensor_name, class_dim)
        stats = self._row_stats.get(key)
        if stats is None or (with_entropy and stats.entropy is None):
            stats = row_statistics(self.tensors[tensor_name], class_dim, with_entropy)
            self._row_stats[key] = stats
        return stats

    def view(self, fdef: FunctionDef, index: int, alias: str, inputs: Mapping[str, str]) -> View:
        return View(self, fdef, index, alias, dict(inputs))


@dataclass
class View:
    """A function's window on a :class:`Batch`: roles resolved to tensors, paths for errors."""

    batch: Batch
    fdef: FunctionDef
    index: int  # position in the request's function list, for error paths
    alias: str
    inputs: dict[str, str]  # role -> tensor name (explicit mappings; the default is the role's own name)

    # -- naming ------------------------------------------------------------
    def tensor_name(self, role: str) -> str:
        return self.inputs.get(role, role)

    def field(self, role: str) -> str:
        """The error path of a role's tensor, e.g. ``tensors.student_logits``."""
        return f"tensors.{self.tensor_name(role)}"

    def param_field(self, name: str) -> str:
        return f"functions[{self.index}].params.{name}"

    def error(self, role: str, description: str) -> InvalidInput:
        return InvalidInput.single(self.field(role), f"{self.fdef.name}: {description}")

    def param_error(self, name: str, description: str) -> InvalidInput:
        return InvalidInput.single(self.param_field(name), f"{self.fdef.name}: {description}")

    def diag(self, code: str, message: str, *, severity: str | None = None, count: int = 1) -> None:
        self.batch.diagnostics.add(code, message, function=self.alias, severity=severity, count=count)

    # -- tensors -----------------------------------------------------------
    def has(self, role: str) -> bool:
        return self.tensor_name(role) in self.batch.tensors

    def tensor(self, role: str) -> torch.Tensor:
        """The role's tensor as sent (dtype unchanged), on the compute device."""
        name = self.tensor_name(role)
        t = self.batch.tensors.get(name)
        if t is None:
            r = self.fdef.role(role)
            raise InvalidInput.single(
                self.field(role),
                f"{self.fdef.name} needs role {role!r} ({r.shape}); no tensor named {name!r} was sent"
                + (f" (map it with inputs: {{{role!r}: TENSOR_NAME}})" if role not in self.inputs else ""),
            )
        self._check_finite(name, t)
        return t

    def optional(self, role: str) -> torch.Tensor | None:
        return self.tensor(role) if self.has(role) else None

    def float(self, role: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The role's tensor in its compute dtype (fp32, or fp64 for fp64 inputs)."""
        t = self.tensor(role)
        if t.dtype not in _FLOAT_DTYPES:
            if t.dtype in _INT_DTYPES or t.dtype == torch.bool:
                return t.to(dtype or torch.float32)
            raise self.error(role, f"expected a floating-point tensor, got {str(t.dtype).replace('torch.', '')}")
        return t.to(dtype or compute_dtype(t.dtype))

    def numeric(self, role: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Like :meth:`float` (integers accepted), but a bool tensor is refused.

        Regression targets or variances may be integer counts, but a bool
        tensor there is almost always a mask sent by mistake; 0/1 values are
        meant only if the caller says so by casting them."""
        t = self.tensor(role)
        if t.dtype == torch.bool:
            raise self.error(role, "expected a floating-point (or integer) tensor, got bool; cast it to float if 0/1 values are meant")
        return self.float(role, dtype=dtype)

    def scores(self, role: str) -> torch.Tensor:
        """A floating-point score tensor (logits, probabilities...) as sent; integer dtypes refused."""
        t = self.tensor(role)
        if t.dtype not in _FLOAT_DTYPES:
            raise self.error(role, f"expected a floating-point tensor (float32, float16, bfloat16 or float64), got {str(t.dtype).replace('torch.', '')}")
        return t

    def index_labels(self, role: str) -> torch.Tensor:
        """Integer class labels as int64. Floats holding integers are cast; anything else is refused."""
        t = self.tensor(role)
        if t.dtype in _INT_DTYPES:
            return t.to(torch.int64)
        if t.dtype == torch.bool:
            raise self.error(role, "expected integer class indices, got bool; send 0/1 as an integer dtype")
        if t.dtype in _FLOAT_DTYPES:
            ok = torch.isfinite(t) & (t == torch.round(t))
            if not bool(ok.all()):
                first = _flat_index(t, ~ok)
                raise self.error(role, f"expected integer class indices, got non-integer value {float(t.reshape(-1)[first])!r} at flat index {first}")
            return t.to(torch.int64)
        raise self.error(role, f"expected integer class indices, got {t.dtype}")

    def check_labels(self, role: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
        """Refuse labels outside [0, K) that are not ``ignore_index``; return the valid mask."""
        valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = _flat_index(labels, bad)
            value = int(labels.reshape(-1)[first])
            self.diag(
                "labels_out_of_range",
                f"tensor {self.tensor_name(role)!r} holds label {value} at flat index {first}, outside [0, {num_classes}) and not "
                f"ignore_index={ignore_index}; fix the labels, the number of classes or ignore_index",
            )
            raise self.error(
                role,
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; got {value} at flat index {first} "
                f"({int(bad.sum())} out-of-range labels in all)",
            )
        return valid

    def binary_targets(self, role: str) -> torch.Tensor:
        """Targets in [0, 1] as floats (soft targets allowed); anything outside is refused."""
        t = self.tensor(role)
        t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        bad = ~((t >= 0) & (t <= 1))
        if bool(bad.any()):
            first = _flat_index(t, bad)
            raise self.error(role, f"expected targets in [0, 1], got {float(t.reshape(-1)[first])!r} at flat index {first}")
        return t

    def expect_ndim(self, role: str, t: torch.Tensor, allowed: tuple[int, ...] | range, shape_text: str) -> None:
        if t.ndim not in allowed:
            raise self.error(role, f"expected shape {shape_text}, got {list(t.shape)}")

    def expect_shape(self, role: str, t: torch.Tensor, shape: tuple[int, ...] | torch.Size, text: str) -> None:
        if tuple(t.shape) != tuple(shape):
            raise self.error(role, f"expected shape {list(shape)} ({text}), got {list(t.shape)}")

    def log_space(self, role: str, input_kind: str) -> str:
        """Name of a tensor holding the role's scores in log space (logits or log-probabilities).

        ``probs`` inputs are refused outside [0, 1] and taken to log space once
        per request (memoized), so functions only ever handle log-space scores."""
        name = self.tensor_name(role)
        t = self.scores(role)
        if input_kind != "probs":
            return name
        derived = f"log({name})"
        if derived not in self.batch.tensors:
            bad = ~((t >= 0) & (t <= 1))
            if bool(bad.any()):
                first = _flat_index(t, bad)
                raise self.error(role, f"input_kind='probs' expects probabilities in [0, 1], got {float(t.reshape(-1)[first])!r} at flat index {first}")
            self.batch.tensors = {**self.batch.tensors, derived: torch.log(t.to(compute_dtype(t.dtype)))}  # type: ignore[misc]
            self.batch._checked_finite.add(derived)  # log(0) = -inf is a legitimate score
        return derived

    def log_scores(self, role: str, input_kind: str) -> torch.Tensor:
        """The role's scores in log space (see :meth:`log_space`), as a tensor."""
        name = self.log_space(role, input_kind)  # may add the derived tensor: look it up afterwards
        return self.batch.tensors[name]

    def row_stats(self, role: str, class_dim: int, *, input_kind: str = "logits", with_entropy: bool = False) -> RowStats:
        """Per-row logsumexp / max / argmax / sum of the role's log-space scores, shared by all functions."""
        name = self.log_space(role, input_kind)
        first = (name, class_dim) not in self.batch._row_stats
        stats = self.batch.row_stats(name, class_dim, with_entropy=with_entropy)
        if first and input_kind == "logits":
            self._diagnose_score_kind(role, stats, class_dim)
        if first and input_kind in ("probs", "log_probs"):
            self._check_normalized(role, stats, input_kind)
        return stats

    def _check_normalized(self, role: str, stats: RowStats, input_kind: str) -> None:
        """Probabilities (or log-probabilities) must be distributions: rows summing to 1.

        Refused rather than renormalized, so that a value is never computed from
        something other than what the caller meant. lse = log Σ_k p_k here."""
        off = (stats.lse.abs() > 1e-3) & torch.isfinite(stats.lse)
        if bool(off.any()):
            first = _flat_index(stats.lse, off)
            total = float(torch.exp(stats.lse.reshape(-1)[first]))
            raise self.error(
                role,
                f"input_kind={input_kind!r} expects rows that are distributions over classes (summing to 1 within 1e-3); "
                f"row {first} sums to {total:.6g}",
            )

    def _diagnose_score_kind(self, role: str, stats: RowStats, class_dim: int) -> None:
        """Warn when "logits" look like probabilities or log-probabilities (never reinterpret them)."""
        if stats.max.numel() == 0 or stats.lse.shape == torch.Size([]):
            return
        t = self.tensor(role)
        if t.shape[class_dim] < 2:
            return
        if bool((stats.max <= 1).all()) and bool(((stats.sum - 1).abs() < 1e-3).all()) and bool((t >= 0).all()):
            self.batch.diagnostics.add(
                "probabilities_as_logits",
                f"every row of {self.tensor_name(role)!r} lies in [0, 1] and sums to 1: these look like probabilities "
                "read as logits; pass input_kind='probs' if they are",
                function=self.alias,
            )
        elif bool((stats.max <= 0).all()) and bool((stats.lse.abs() < 1e-3).all()):
            self.batch.diagnostics.add(
                "log_probs_as_logits",
                f"every row of {self.tensor_name(role)!r} is a normalized log-distribution; results are unaffected for "
                "softmax losses, but pass input_kind='log_probs' to say so",
                function=self.alias,
            )

    def sample_weights(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """The optional ``weights`` role, broadcast over trailing dims to ``shape``.

        Weights of shape [N] weight whole rows of [N, d1, ...] elements; the
        shape must match ``shape``'s leading dimensions exactly."""
        if not self.has("weights"):
            return None
        w = self.float("weights").to(dtype)
        if tuple(w.shape) != tuple(shape[: w.ndim]):
            raise self.error("weights", f"expected shape {list(shape)} or a prefix of it, got {list(w.shape)}")
        if bool((w < 0).any()):
            raise self.error("weights", "expected non-negative weights")
        return w.reshape(tuple(w.shape) + (1,) * (len(shape) - w.ndim)).expand(shape)

    def _check_finite(self, name: str, t: torch.Tensor) -> None:
        if name in self.batch._checked_finite:
            return
        self.batch._checked_finite.add(name)
        if t.dtype in _FLOAT_DTYPES and t.numel():
            bad, at_limit = count_nonfinite(t)
            if bad:
                self.batch.diagnostics.add("nan_or_inf", f"tensor {name!r} holds {bad} NaN or infinite values")
                if t.dtype == torch.float16:
                    self.batch.diagnostics.add("precision_loss", f"float16 tensor {name!r} holds infinities, likely overflow beyond ±65504; send float32 or bfloat16")
            elif t.dtype == torch.float16 and at_limit:
                self.batch.diagnostics.add("precision_loss", f"float16 tensor {name!r} holds values at the float16 limit ±65504; send float32 or bfloat16")


def _flat_index(t: torch.Tensor, mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0][0])
