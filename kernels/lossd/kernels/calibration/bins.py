"""Calibration bins: the bin rule, the roles and parameters of every calibration statistic, and its scores.

The bin rule (CATALOGUE.md): bin b of B equal-width bins covers (b/B, (b+1)/B],
bin 0 also holds 0, and a confidence of exactly 1.0 falls in the last bin;
each bin keeps (n_b, Σ confidence, Σ correct) in float64, which merges by
addition.  Inputs are multiclass scores [N, K] (or [N, K, d1, ...]) with
class-index ``labels``, or binary scores [N] with 0/1 ``targets`` (p = σ(z));
the argmax and the row maximum come from the request's shared row statistics.

Edges stay exact.  ``input_kind=probs`` rows are binned as given, never
through log and exp (a row off 1 by more than rounding, within the 1e-3 the
service accepts, is renormalized first: p / Σp), and a confidence equal to an
edge in its own precision (float32 0.1 with ten bins) goes to the bin below.
From logits the top-1 confidence is max softmax = 1 / Σ exp(z − max) in
the compute dtype, so that a representable edge (two tied logits: 1/2) is
exact, where exp(max − lse) may land an ulp above it, and m tied logits
give the nearest 1/m of that dtype, on its edge (the edges are rounded to
the confidences' precision).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lossd.kernels.chunks import iter_row_chunks
from lossd.kernels.declarations import Example, Role
from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.examples import K, normal
from lossd.kernels.examples import class_labels as example_labels
from lossd.kernels.losses.classification import INPUT_KIND, class_labels
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.view import View

__all__ = [
    "F64",
    "ADAPTIVE_HISTOGRAM_BINS",
    "SCORES",
    "LABELS",
    "TARGETS",
    "ROLES",
    "N_BINS",
    "NORM",
    "SCOPE",
    "COMMON",
    "EXAMPLE",
    "bin_index",
    "edge_precision",
    "renormalized",
    "bin_edges",
    "rounded_edges",
    "bin_sums",
    "BinaryScores",
    "MulticlassScores",
    "read_scores",
    "top_label",
    "positive_class",
    "class_probabilities",
]


F64 = torch.float64

# Resolution of the fixed histogram behind adaptive_ece across streams.
ADAPTIVE_HISTOGRAM_BINS = 1000


SCORES = Role(
    "logits",
    "[N, K], [N, K, d1, ...] or [N] (binary)",
    "float",
    "class scores (logits, log-probabilities or probabilities per input_kind); [N] is binary with p(y=1) = σ(z)",
)
LABELS = Role(
    "labels",
    "[N] or [N, d1, ...]",
    "index",
    "class indices in [0, K) or ignore_index, with [N, K, ...] scores",
    optional=True,
    one_of="truth",
)
TARGETS = Role("targets", "[N]", "binary", "0/1 targets, with binary [N] scores", optional=True, one_of="truth")
ROLES = (SCORES, LABELS, TARGETS)

N_BINS = Param("n_bins", "int", 15, "number of equal-width confidence bins B; bin b covers (b/B, (b+1)/B]", minimum=1, maximum=1000)
NORM = Param(
    "norm",
    "str",
    "l1",
    "l1: Σ (n_b/N)·|acc_b − conf_b|; l2: sqrt of the weighted squares; max: largest gap over non-empty bins",
    choices=("l1", "l2", "max"),
)
SCOPE = Param(
    "scope",
    "str",
    "top_label",
    "top_label: top-1 confidence vs correctness; positive_class: p(y=1) vs y (binary inputs); "
    "classwise: every p_k vs [y = k], the mean over classes of each class's value",
    choices=("top_label", "positive_class", "classwise"),
)
SCOPE_1D = Param(
    "scope",
    "str",
    "top_label",
    "top_label: top-1 confidence vs correctness; positive_class: p(y=1) vs y (binary inputs)",
    choices=("top_label", "positive_class"),
)
COMMON = (INPUT_KIND, IGNORE_INDEX)

# Every class present, none rare: the clean example of every calibration statistic.
EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, K), "labels": example_labels(n)})


# -- the bin rule -------------------------------------------------------------


def bin_index(conf: torch.Tensor, n_bins: int, precision: torch.dtype = F64) -> torch.Tensor:
    """Equal-width bin of each confidence: bin b covers (b/B, (b+1)/B], 0 in bin 0, 1.0 in bin B−1.

    ceil(c·B) − 1 in float64 can land one bin off when c·B rounds across an
    integer (0.3·10 = 3.0000000000000004), so the index is settled against the
    edges b/B themselves, rounded to ``precision`` (the dtype the confidences
    were given in: float32 probabilities meet the float32 edges, so the float32
    nearest 0.1 is on the edge 0.1): a confidence equal to an edge always goes
    to the bin below it, as in uncertainty-calibration and sklearn."""
    c = conf.to(F64)
    edges = rounded_edges(n_bins, precision).to(c.device)
    # NaN confidences (from NaN or inf scores) go to bin 0, where they make the sums NaN.
    idx = torch.nan_to_num(torch.ceil(c * n_bins) - 1, nan=0.0).clamp(0, n_bins - 1).to(torch.int64)
    idx = torch.where((c <= edges[idx]) & (idx > 0), idx - 1, idx)
    return torch.where((c > edges[idx + 1]) & (idx < n_bins - 1), idx + 1, idx)


@functools.lru_cache(maxsize=64)
def rounded_edges(n_bins: int, precision: torch.dtype) -> torch.Tensor:
    """bin_edges(n_bins) rounded to ``precision``, as float64 on the CPU.

    Cached: every binning of a request would otherwise build the same edges
    again (four ops, which a small request pays in full).  Callers only read it."""
    return bin_edges(n_bins).to(precision).to(F64)


def bin_edges(n_bins: int) -> torch.Tensor:
    """The B+1 float64 edges b/B of the equal-width bins."""
    return torch.arange(n_bins + 1, dtype=F64) / n_bins


def bin_sums(
    conf: torch.Tensor,
    correct: torch.Tensor,
    n_bins: int,
    *,
    group: torch.Tensor | None = None,
    groups: int = 1,
    precision: torch.dtype = F64,
) -> torch.Tensor:
    """Per-bin (n_b, Σ confidence, Σ correct) in float64: [B, 3], or [groups, B, 3] by ``group`` index.

    ``precision``: the dtype the confidences were given in (see :func:`bin_index`)."""
    idx = bin_index(conf, n_bins, precision)
    if group is not None:
        idx = group * n_bins + idx
    idx = idx.reshape(-1)
    columns = []
    for values in (torch.ones_like(idx, dtype=F64), conf.reshape(-1).to(F64), correct.reshape(-1).to(F64)):
        columns.append(torch.zeros(groups * n_bins, dtype=F64, device=conf.device).index_add_(0, idx, values))
    out = torch.stack(columns, dim=-1)
    return out if group is None else out.reshape(groups, n_bins, 3)


def edge_precision(view: View, p: Mapping[str, Any]) -> torch.dtype:
    """The precision of the edges: that of the confidences being binned.

    The scores' compute dtype for probabilities binned as given and for the
    top-1 confidence of multiclass scores (a softmax in that dtype: ten tied
    float32 logits give the float32 nearest 0.1, on the float32 edge 0.1);
    float64 for sigmoids and the classwise softmax, computed in float64."""
    z = view.scores("logits")
    top_of_classes = p.get("scope", "top_label") == "top_label" and z.ndim >= 2
    return compute_dtype(z.dtype) if p["input_kind"] == "probs" or top_of_classes else F64


def renormalized(probs: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    """Rows [m, K] of probabilities as float64, divided by their sum unless it is 1 within rounding.

    The service accepts rows summing to 1 within 1e-3 and renormalizes them;
    a row that is a distribution up to the rounding of its dtype (K·ε) is
    used as given, so that a confidence on an edge stays on it."""
    p = probs.to(F64)
    total = p.sum(dim=1, keepdim=True)
    exact = (total - 1).abs() <= p.shape[1] * torch.finfo(precision).eps
    return torch.where(exact, p, p / total)


# -- reading the scores -------------------------------------------------------


@dataclass
class BinaryScores:
    """Binary [N] scores as float64 [N]: p(y=1), 1 − p(y=1), the 0/1 targets and the logit."""

    positive: torch.Tensor
    negative: torch.Tensor  # 1 − p, computed without cancellation for logits
    targets: torch.Tensor
    logit: torch.Tensor  # log p − log(1 − p), ±inf at p ∈ {0, 1}


@dataclass
class MulticlassScores:
    """Multiclass scores [N, K, ...]: the log-space tensor, the scores as sent and valid rows' labels (flattened)."""

    scores: torch.Tensor  # log-space scores (logits or log-probabilities), torch layout
    labels: torch.Tensor  # [N·d] int64, ignored rows set to 0
    valid: torch.Tensor  # [N·d] bool
    num_classes: int
    sent: torch.Tensor  # the scores as sent (probabilities for input_kind=probs): what the bins read
    confidence: Callable[[], torch.Tensor]  # the batch's memoized top-1 confidence of ``scores`` (one pass, shared)


def read_scores(view: View, p: Mapping[str, Any]) -> BinaryScores | MulticlassScores:
    """The ``logits`` role read as binary [N] scores with targets, or multiclass scores with labels."""
    z = view.scores("logits")
    if z.ndim == 1:
        return _read_binary(view, z, p["input_kind"])
    view.expect_ndim("logits", z, range(2, 9), "[N, K], [N, K, d1, ...] or [N] (binary)")
    if not view.has("labels"):
        raise view.error("labels", f"{list(z.shape)} scores need class indices (role 'labels'); binary targets go with [N] scores")
    y, valid = class_labels(view, z, p["ignore_index"])
    name = view.log_space("logits", p["input_kind"])
    view.row_stats("logits", 1, input_kind=p["input_kind"])  # refuses rows that are not what input_kind says
    batch = view.batch
    return MulticlassScores(batch.tensors[name], y.reshape(-1), valid.reshape(-1), z.shape[1], z, lambda: batch.top1_confidence(name, 1))


def _read_binary(view: View, z: torch.Tensor, input_kind: str) -> BinaryScores:
    if not view.has("targets"):
        raise view.error("targets", "binary [N] scores need 0/1 targets (role 'targets'); class indices go with [N, K] scores")
    t = view.binary_targets("targets")
    view.expect_shape("targets", t, z.shape, "one target per score")
    hard = (t == 0) | (t == 1)
    if not bool(hard.all()):
        first = int(torch.nonzero(~hard)[0][0])
        raise view.error("targets", f"calibration needs hard 0/1 targets, got {float(t[first])!r} at flat index {first}")
    x = z.to(F64)
    if input_kind == "logits":
        return BinaryScores(torch.sigmoid(x), torch.sigmoid(-x), t.to(F64), x)
    if input_kind == "log_probs":
        bad = ~(x <= 0)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0][0])
            raise view.error(
                "logits", f"input_kind='log_probs' expects log-probabilities <= 0, got {float(x[first])!r} at flat index {first}"
            )
        negative = -torch.expm1(x)
        return BinaryScores(torch.exp(x), negative, t.to(F64), x - torch.log(negative))
    bad = ~((x >= 0) & (x <= 1))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0][0])
        raise view.error("logits", f"input_kind='probs' expects probabilities in [0, 1], got {float(x[first])!r} at flat index {first}")
    return BinaryScores(x, 1 - x, t.to(F64), torch.log(x) - torch.log1p(-x))


def _probability_rows(s: MulticlassScores, input_kind: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first_row, p [m, K] float64) over every row: probabilities as given (renormalized), or softmax of log-space scores.

    softmax as e / Σe with e = exp(z − max): the top class's e is exactly 1."""
    precision = compute_dtype(s.sent.dtype)
    for first, rows in iter_row_chunks(s.sent, 1):
        if input_kind == "probs":
            yield first, renormalized(rows, precision)
            continue
        z = rows.to(F64)
        peak = z.amax(dim=1, keepdim=True)
        e = torch.exp(z - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
        yield first, e / e.sum(dim=1, keepdim=True)


def _top1_confidence(s: MulticlassScores, input_kind: str) -> torch.Tensor:
    """max_k p_k per row, flat float64 [N·d]: p_max / Σp for probabilities (as given), else :func:`top1_confidence`."""
    if input_kind != "probs":
        return s.confidence().reshape(-1)
    out = torch.empty(s.labels.numel(), dtype=F64, device=s.sent.device)
    precision = compute_dtype(s.sent.dtype)
    for first, rows in iter_row_chunks(s.sent, 1):
        out[first : first + rows.shape[0]] = renormalized(rows, precision).amax(dim=1)
    return out


def top_label(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) of the top-1 prediction, float64 [M] over valid rows."""
    s = read_scores(view, p)
    if isinstance(s, BinaryScores):
        # Class 1 is predicted only when p > 1/2: the [N, 2] argmax picks class 0 on ties.
        pred = s.logit > 0
        return torch.where(pred, s.positive, s.negative), (pred.to(F64) == s.targets).to(F64)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    conf = _top1_confidence(s, p["input_kind"])[s.valid]
    correct = stats.argmax.reshape(-1)[s.valid] == s.labels[s.valid]
    return conf, correct.to(F64)


def positive_class(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(y=1), y) float64 [M] for binary inputs: [N] scores with targets, or [N, 2] with labels."""
    s = read_scores(view, p)
    if isinstance(s, BinaryScores):
        return s.positive, s.targets
    if s.num_classes != 2:
        raise view.param_error(
            "scope", f"scope='positive_class' needs binary scores ([N] with targets or [N, 2] with labels), got K={s.num_classes} classes"
        )
    p1 = torch.cat([rows[:, 1] for _, rows in _probability_rows(s, p["input_kind"])])
    return p1[s.valid], (s.labels[s.valid] == 1).to(F64)


def class_probabilities(
    view: View, s: BinaryScores | MulticlassScores, input_kind: str, step: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of at most ``step`` rows: (p [m, K] float64, labels [m]) over valid rows; softmax is never whole."""
    if isinstance(s, BinaryScores):
        for r in range(0, s.positive.numel(), step):
            part = slice(r, r + step)
            yield torch.stack([s.negative[part], s.positive[part]], dim=1), s.targets[part].to(torch.int64)
        return
    for first, probs in _probability_rows(s, input_kind):
        for r in range(0, probs.shape[0], step):
            part = slice(first + r, first + min(r + step, probs.shape[0]))
            valid = s.valid[part]
            yield probs[r : r + step][valid], s.labels[part][valid]
