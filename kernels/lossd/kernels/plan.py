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

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from lossd.kernels.diagnostics import Diagnostics
from lossd.kernels.errors import InvalidInput
from lossd.kernels.registry import FunctionDef

__all__ = ["Batch", "View", "RowStats", "compute_dtype", "first_index", "CHUNK_ELEMENTS"]

# Rows are processed in chunks of about this many elements (64 MiB of float32)
# so that no intermediate of the size of the whole logits tensor is ever made.
CHUNK_ELEMENTS = 1 << 24

# On CPU, the row statistics work on blocks of about this many elements of a
# chunk (4 MiB of float32), so that the exp temporary stays in the last-level
# cache. Measured on [512, 32768] float32: 3x faster than whole 64 MiB chunks;
# blocks 4x smaller are no faster and pay 4x the per-op (thread barrier) costs.
CACHE_BLOCK_ELEMENTS = 1 << 20

# Rows whose max score lies within ±this take logsumexp as log Σ e^z, unshifted:
# e^60 · 1e12 classes is still far from the float32 limit, e^-60 far from its
# subnormals.
_UNSHIFTED_MAX = 60.0

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)


# class_imbalance: the rarest class present holds less than this share of the labels.
IMBALANCE_SHARE = 0.01
# Below this many labels a 1% share is less than one label; above this many
# classes a small share is what a uniform distribution gives.
IMBALANCE_MIN_LABELS = 100
IMBALANCE_MAX_CLASSES = 100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 inputs are computed in fp32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        # Fast path: a finite sum, or a finite min and max, proves every element finite
        # (NaN and inf propagate); otherwise (possibly mere overflow of the sum) count exactly.
        if block.element_size() == 2:
            # 16-bit floats: aminmax reads them as they are, where sum(dtype=float32) casts the
            # block first (measured: 15x slower); the max and min also give the float16 limit.
            low, high = torch.aminmax(block)
            finite = bool(torch.isfinite(low) & torch.isfinite(high))
            if half and not at_limit:
                at_limit = bool((high >= 65504) | (low <= -65504))
        else:
            finite = bool(torch.isfinite(block.sum(dtype=acc)))
        if not finite:
            bad += int((~torch.isfinite(block)).sum())
    return bad, at_limit


def _cache_blocks(x: torch.Tensor, class_dim: int) -> Iterator[tuple[int, torch.Tensor]]:
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


def _row_count(x: torch.Tensor, class_dim: int) -> int:
    return math.prod(x.shape[:class_dim] + x.shape[class_dim + 1 :])


def _row_reduce(source: tuple[torch.Tensor, int], reduce: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """reduce(block [m, K] in the compute dtype) -> [m], over every row of the source, flat."""
    x, class_dim = source
    compute = compute_dtype(x.dtype)
    out = torch.empty(_row_count(x, class_dim), dtype=dtype, device=x.device)
    for row, z in _cache_blocks(x, class_dim):
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
    out = torch.empty(_row_count(x, class_dim), dtype=compute_dtype(x.dtype), device=x.device)
    for row, z in _cache_blocks(x, class_dim):
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
    out_shape = x.shape[:class_dim] + x.shape[class_dim + 1 :]
    rows = math.prod(out_shape)
    lse = torch.empty(rows, dtype=dtype, device=x.device)
    mx = torch.empty(rows, dtype=dtype, device=x.device)
    ent = torch.empty(rows, dtype=dtype, device=x.device) if with_entropy else None
    for row, z in _cache_blocks(x, class_dim):
        z = z.to(dtype)
        block = _block_logsumexp(z)
        stop = row + z.shape[0]
        lse[row:stop], mx[row:stop] = block.lse, block.max
        if ent is not None:  # from the same e: no second exp
            ent[row:stop] = _block_entropy(z, block)
    entropy = None if ent is None else ent.reshape(out_shape)
    return RowStats(lse.reshape(out_shape), mx.reshape(out_shape), entropy=entropy, source=(x, class_dim))


@functools.cache
def _row_stats_kernel() -> Any:
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


@dataclass
class Batch:
    """One request's tensors on the compute device, with memoized intermediates."""

    tensors: Mapping[str, torch.Tensor]
    device: torch.device
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    settings: Mapping[str, Any] = field(default_factory=dict)
    _row_stats: dict[tuple[str, int], RowStats] = field(default_factory=dict)
    _checked_finite: set[str] = field(default_factory=set)
    _judged_balance: set[str] = field(default_factory=set)  # label tensors already judged for class_imbalance

    def row_stats(self, tensor_name: str, class_dim: int, *, with_entropy: bool = False) -> RowStats:
        key = (tensor_name, class_dim)
        stats = self._row_stats.get(key)
        if stats is None:
            stats = row_statistics(self.tensors[tensor_name], class_dim, with_entropy)
            self._row_stats[key] = stats
        elif with_entropy and stats.entropy is None:  # one more pass, for the entropy alone
            stats.entropy = row_entropy(self.tensors[tensor_name], class_dim)
        return stats

    def memoized_row_stats(self, tensor_name: str, class_dim: int) -> RowStats | None:
        """The row statistics a function already computed for this tensor and class dim, or None (never computes)."""
        return self._row_stats.get((tensor_name, class_dim))

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
            raise self.error(
                role, f"expected a floating-point tensor (float32, float16, bfloat16 or float64), got {str(t.dtype).replace('torch.', '')}"
            )
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
                first = first_index(~ok)
                raise self.error(
                    role, f"expected integer class indices, got non-integer value {float(t.reshape(-1)[first])!r} at flat index {first}"
                )
            return t.to(torch.int64)
        raise self.error(role, f"expected integer class indices, got {t.dtype}")

    def check_labels(self, role: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
        """Refuse labels outside [0, K) that are not ``ignore_index``; return the valid mask."""
        valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = first_index(bad)
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
            first = first_index(bad)
            raise self.error(role, f"expected targets in [0, 1], got {float(t.reshape(-1)[first])!r} at flat index {first}")
        if bool(((t == 0) | (t == 1)).all()):  # hard targets: judge the class balance (soft ones have none)
            self.diagnose_class_imbalance(role, t.to(torch.int64), torch.ones_like(t, dtype=torch.bool), 2)
        return t

    def diagnose_class_imbalance(self, role: str, labels: torch.Tensor, valid: torch.Tensor, k: int) -> None:
        """class_imbalance, once per request and tensor: the rarest class present holds < 1% of the labels.

        Judged only with at least 100 labels, two classes present and at most 100
        classes, where a 1% share says something about the data. Request-level:
        every function reading these labels would say the same."""
        name = self.tensor_name(role)
        if k > IMBALANCE_MAX_CLASSES or name in self.batch._judged_balance:
            return
        self.batch._judged_balance.add(name)
        labels = labels[valid]
        n = labels.numel()
        if n < IMBALANCE_MIN_LABELS:
            return
        counts = torch.bincount(labels.reshape(-1), minlength=k)
        present = counts > 0
        if int(present.sum()) < 2:
            return
        rarest = int(torch.where(present, counts, torch.full_like(counts, n + 1)).argmin())
        share = int(counts[rarest]) / n
        if share < IMBALANCE_SHARE:
            self.batch.diagnostics.add(
                "class_imbalance",
                f"in tensor {self.tensor_name(role)!r}, class {rarest} holds {int(counts[rarest])} of {n} labels ({share:.2%}); "
                "means and accuracy are dominated by the majority class, read per-class recall or macro F1 as well",
            )

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
                first = first_index(bad)
                raise self.error(
                    role, f"input_kind='probs' expects probabilities in [0, 1], got {float(t.reshape(-1)[first])!r} at flat index {first}"
                )
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
            first = first_index(off)
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
        if (
            bool((stats.max <= 1).all())
            and _lse_allows_probabilities(stats.lse, t.shape[class_dim])
            and bool(((stats.sum - 1).abs() < 1e-3).all())
            and bool(t.amin() >= 0)  # a NaN gives NaN here, hence False, as (t >= 0).all() does
        ):
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
                    self.batch.diagnostics.add(
                        "precision_loss",
                        f"float16 tensor {name!r} holds infinities, likely overflow beyond ±65504; send float32 or bfloat16",
                    )
            elif t.dtype == torch.float16 and at_limit:
                self.batch.diagnostics.add(
                    "precision_loss", f"float16 tensor {name!r} holds values at the float16 limit ±65504; send float32 or bfloat16"
                )


def _lse_allows_probabilities(lse: torch.Tensor, k: int) -> bool:
    """Whether every row's logsumexp is one of scores in [0, 1] summing to 1 ± 1e-3 over ``k`` classes.

    For such scores Σ_k e^{z_k} lies between K·e^{s/K} (Jensen) and
    K + s·(e − 1) (e^z ≤ 1 + z·(e − 1) on [0, 1]), with s = Σz: a necessary
    condition read from the shared lse, which rules out logits and
    log-probabilities before the Σz pass over the scores is paid for."""
    low = math.log(k) + (1 - 1e-3) / k - 1e-3
    high = math.log(k + (1 + 1e-3) * (math.e - 1)) + 1e-3
    return bool(((lse >= low) & (lse <= high)).all())


def first_index(mask: torch.Tensor) -> int:
    """The flat (row-major) index of the first True element of ``mask``: where an error points."""
    return int(torch.nonzero(mask.reshape(-1))[0][0])
