"""Calibration: ECE and its variants, the reliability diagram and temperature, as mergeable bins.

Every binned statistic here reads the same sufficient statistics: for each
equal-width confidence bin, (n_b, Σ confidence, Σ correct) in float64.  Sums
merge exactly across chunks, streams, ranks and replicas, so the ECE of a
whole evaluation set is the ECE of its pooled bins, never a mean of batch
ECEs.  The bin rule (CATALOGUE.md): bin b covers (b/B, (b+1)/B], bin 0 also
holds 0, and a confidence of exactly 1.0 falls in the last bin.

Inputs are multiclass scores [N, K] (or [N, K, d1, ...]) with class-index
``labels``, or binary scores [N] with 0/1 ``targets`` (p = σ(z)).  Top-label
confidence and the argmax come from the request's shared row statistics, so
ECE next to cross-entropy and accuracy costs no extra pass over the logits.

``adaptive_ece`` (equal-mass bins) cannot be merged exactly; its state holds
both the exact value of one update and a fine 1000-bin histogram, and says
in its output which one it used.  ``temperature`` keeps the summed NLL on a
fixed log-spaced grid of temperatures, so it merges exactly too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lossd.kernels.losses.classification import INPUT_KIND, class_labels
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.plan import View, compute_dtype, iter_row_chunks
from lossd.kernels.registry import FunctionDef, Output, Result, Role, register
from lossd.kernels.state import MergeOp

__all__ = [
    "bin_index",
    "bin_sums",
    "bin_edges",
    "equal_mass_ece",
    "histogram_adaptive_ece",
    "temperature_grid",
    "ADAPTIVE_HISTOGRAM_BINS",
]

F64 = torch.float64

# Resolution of the fixed histogram behind adaptive_ece across streams.
ADAPTIVE_HISTOGRAM_BINS = 1000

# Elements of one [rows, temperatures, classes] block in the temperature pass,
# and of one [rows, classes] block of classwise binning (about ten temporaries each).
_TEMPERATURE_BLOCK = 1 << 22
_CLASSWISE_BLOCK = 1 << 22

SCORES = Role(
    "logits",
    "[N, K], [N, K, d1, ...] or [N] (binary)",
    "float",
    "class scores (logits, log-probabilities or probabilities per input_kind); [N] is binary with p(y=1) = σ(z)",
)
LABELS = Role("labels", "[N] or [N, d1, ...]", "index", "class indices in [0, K) or ignore_index, with [N, K, ...] scores", optional=True)
TARGETS = Role("targets", "[N]", "binary", "0/1 targets, with binary [N] scores", optional=True)
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


# -- the bin rule -------------------------------------------------------------


def bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each confidence: bin b covers (b/B, (b+1)/B], 0 in bin 0, 1.0 in bin B−1.

    ceil(c·B) − 1 in float64 can land one bin off when c·B rounds across an
    integer (0.3·10 = 3.0000000000000004), so the index is settled against the
    float64 edges b/B themselves: a confidence equal to an edge always goes
    to the bin below it, as in uncertainty-calibration and sklearn."""
    c = conf.to(F64)
    # NaN confidences (from NaN or inf scores) go to bin 0, where they make the sums NaN.
    idx = torch.nan_to_num(torch.ceil(c * n_bins) - 1, nan=0.0).clamp(0, n_bins - 1).to(torch.int64)
    lower = idx.to(F64) / n_bins
    idx = torch.where((c <= lower) & (idx > 0), idx - 1, idx)
    upper = (idx + 1).to(F64) / n_bins
    return torch.where((c > upper) & (idx < n_bins - 1), idx + 1, idx)


def bin_edges(n_bins: int) -> torch.Tensor:
    """The B+1 float64 edges b/B of the equal-width bins."""
    return torch.arange(n_bins + 1, dtype=F64) / n_bins


def bin_sums(conf: torch.Tensor, correct: torch.Tensor, n_bins: int, *, group: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """Per-bin (n_b, Σ confidence, Σ correct) in float64: [B, 3], or [groups, B, 3] by ``group`` index."""
    idx = bin_index(conf, n_bins)
    if group is not None:
        idx = group * n_bins + idx
    idx = idx.reshape(-1)
    columns = []
    for values in (torch.ones_like(idx, dtype=F64), conf.reshape(-1).to(F64), correct.reshape(-1).to(F64)):
        columns.append(torch.zeros(groups * n_bins, dtype=F64, device=conf.device).index_add_(0, idx, values))
    out = torch.stack(columns, dim=-1)
    return out if group is None else out.reshape(groups, n_bins, 3)


# -- reading the scores -------------------------------------------------------


@dataclass
class _Binary:
    """Binary [N] scores as float64 [N]: p(y=1), 1 − p(y=1), the 0/1 targets and the logit."""

    positive: torch.Tensor
    negative: torch.Tensor  # 1 − p, computed without cancellation for logits
    targets: torch.Tensor
    logit: torch.Tensor  # log p − log(1 − p), ±inf at p ∈ {0, 1}


@dataclass
class _Multiclass:
    """Multiclass scores [N, K, ...]: the log-space tensor and valid rows' labels (flattened)."""

    scores: torch.Tensor  # log-space scores (logits or log-probabilities), torch layout
    labels: torch.Tensor  # [N·d] int64, ignored rows set to 0
    valid: torch.Tensor  # [N·d] bool
    num_classes: int


def _read(view: View, p: Mapping[str, Any]) -> _Binary | _Multiclass:
    z = view.scores("logits")
    if z.ndim == 1:
        return _read_binary(view, z, p["input_kind"])
    view.expect_ndim("logits", z, range(2, 9), "[N, K], [N, K, d1, ...] or [N] (binary)")
    if not view.has("labels"):
        raise view.error("labels", f"{list(z.shape)} scores need class indices (role 'labels'); binary targets go with [N] scores")
    y, valid = class_labels(view, z, p["ignore_index"])
    name = view.log_space("logits", p["input_kind"])
    return _Multiclass(view.batch.tensors[name], y.reshape(-1), valid.reshape(-1), z.shape[1])


def _read_binary(view: View, z: torch.Tensor, input_kind: str) -> _Binary:
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
        return _Binary(torch.sigmoid(x), torch.sigmoid(-x), t.to(F64), x)
    if input_kind == "log_probs":
        bad = ~(x <= 0)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0][0])
            raise view.error(
                "logits", f"input_kind='log_probs' expects log-probabilities <= 0, got {float(x[first])!r} at flat index {first}"
            )
        negative = -torch.expm1(x)
        return _Binary(torch.exp(x), negative, t.to(F64), x - torch.log(negative))
    bad = ~((x >= 0) & (x <= 1))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0][0])
        raise view.error("logits", f"input_kind='probs' expects probabilities in [0, 1], got {float(x[first])!r} at flat index {first}")
    return _Binary(x, 1 - x, t.to(F64), torch.log(x) - torch.log1p(-x))


def _top_label(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) of the top-1 prediction, float64 [M] over valid rows."""
    s = _read(view, p)
    if isinstance(s, _Binary):
        # Class 1 is predicted only when p > 1/2: the [N, 2] argmax picks class 0 on ties.
        pred = s.logit > 0
        return torch.where(pred, s.positive, s.negative), (pred.to(F64) == s.targets).to(F64)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    conf = stats.top1_confidence.reshape(-1)[s.valid].to(F64)
    correct = stats.argmax.reshape(-1)[s.valid] == s.labels[s.valid]
    return conf, correct.to(F64)


def _positive_class(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(y=1), y) float64 [M] for binary inputs: [N] scores with targets, or [N, 2] with labels."""
    s = _read(view, p)
    if isinstance(s, _Binary):
        return s.positive, s.targets
    if s.num_classes != 2:
        raise view.param_error(
            "scope", f"scope='positive_class' needs binary scores ([N] with targets or [N, 2] with labels), got K={s.num_classes} classes"
        )
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    log_p1 = s.scores.select(1, 1).reshape(-1).to(F64) - stats.lse.reshape(-1).to(F64)
    return torch.exp(log_p1)[s.valid], (s.labels[s.valid] == 1).to(F64)


def _class_probabilities(view: View, s: _Binary | _Multiclass, input_kind: str, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of at most ``step`` rows: (p [m, K] float64, labels [m]) over valid rows; softmax is never whole."""
    if isinstance(s, _Binary):
        for r in range(0, s.positive.numel(), step):
            part = slice(r, r + step)
            yield torch.stack([s.negative[part], s.positive[part]], dim=1), s.targets[part].to(torch.int64)
        return
    lse = view.row_stats("logits", 1, input_kind=input_kind).lse.reshape(-1)
    for first, rows in iter_row_chunks(s.scores, 1):
        for r in range(0, rows.shape[0], step):
            part = slice(first + r, first + min(r + step, rows.shape[0]))
            valid = s.valid[part]
            yield torch.exp(rows[r : r + step][valid].to(F64) - lse[part][valid, None].to(F64)), s.labels[part][valid]


def _classwise_sums(view: View, p: Mapping[str, Any], n_bins: int) -> torch.Tensor:
    """[K, B, 3] bins of every class probability p_k against [y = k]."""
    s = _read(view, p)
    k = 2 if isinstance(s, _Binary) else s.num_classes
    out = torch.zeros(k, n_bins, 3, dtype=F64, device=view.batch.device)
    classes = torch.arange(k, device=view.batch.device)
    for probs, labels in _class_probabilities(view, s, p["input_kind"], max(1, _CLASSWISE_BLOCK // k)):
        hit = labels[:, None] == classes[None, :]
        out += bin_sums(probs, hit, n_bins, group=classes.expand_as(probs), groups=k)
    return out


def _bins_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    scope = p.get("scope", "top_label")
    if scope == "classwise":
        return {"bins": _classwise_sums(view, p, p["n_bins"])}
    conf, correct = (_positive_class if scope == "positive_class" else _top_label)(view, p)
    return {"bins": bin_sums(conf, correct, p["n_bins"])}


# -- statistics of merged bins -----------------------------------------------


def _split(bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n_b, Σ conf, Σ correct, N) of [..., B, 3] bins."""
    n, conf, correct = bins.unbind(-1)
    return n, conf, correct, n.sum(-1)


def _calibration_error(bins: torch.Tensor, norm: str) -> torch.Tensor:
    """ECE of [..., B, 3] bins over the last bin axis; NaN where no sample was binned."""
    n, conf, correct, total = _split(bins)
    gap = correct - conf  # n_b · (acc_b − conf_b)
    nonempty = n > 0
    safe_n = torch.where(nonempty, n, torch.ones_like(n))
    if norm == "l1":
        value = gap.abs().sum(-1) / total
    elif norm == "l2":
        value = torch.sqrt((gap * gap / safe_n).sum(-1) / total)
    else:
        per_bin = torch.where(nonempty, gap.abs() / safe_n, torch.full_like(n, -math.inf))
        value = per_bin.max(-1).values
    return torch.where(total > 0, value, torch.full_like(total, math.nan))


def _debiased_square(bins: torch.Tensor) -> torch.Tensor:
    """Kumar et al. (2019) unbiased estimate of the squared L2 calibration error.

    Σ_b (n_b/N)·[(conf_b − acc_b)² − acc_b(1 − acc_b)/(n_b − 1)], bins with
    n_b < 2 contributing 0 (uncertainty-calibration's unbiased_square_ce)."""
    n, conf, correct, total = _split(bins)
    enough = n >= 2
    safe_n = torch.where(enough, n, torch.full_like(n, 2.0))
    acc, mean_conf = correct / safe_n, conf / safe_n
    term = (mean_conf - acc) ** 2 - acc * (1 - acc) / (safe_n - 1)
    value = (torch.where(enough, n * term, torch.zeros_like(n))).sum(-1) / total
    return torch.where(total > 0, value, torch.full_like(total, math.nan))


def _count(fields: Mapping[str, torch.Tensor]) -> float:
    return float(fields["bins"][..., 0].sum(-1).reshape(-1)[0]) if fields["bins"].numel() else 0.0


def _empty_check(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    if _count(fields) == 0:
        return [("all_ignored", "no sample was binned (all labels ignored or an empty batch); the value is NaN with denominator 0")]
    return []


def _finalize_ece(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    error = _calibration_error(fields["bins"], p.get("norm", "max"))
    if p.get("scope") == "classwise":
        return Result({"value": float(error.mean())}, {"per_class": error.numpy()}, _count(fields), "samples")
    return Result({"value": float(error)}, denominator=_count(fields), denominator_kind="samples")


def _finalize_debiased(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    square = float(_debiased_square(fields["bins"]))
    value = math.sqrt(max(square, 0.0)) if not math.isnan(square) else math.nan
    return Result({"value": value, "squared": square}, denominator=_count(fields), denominator_kind="samples")


def _finalize_reliability(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    n, conf, correct, total = _split(fields["bins"])
    nonempty = n > 0
    safe_n = torch.where(nonempty, n, torch.ones_like(n))
    nan = torch.full_like(n, math.nan)
    over = float((conf - correct).clamp(min=0).sum() / total) if total > 0 else math.nan
    under = float((correct - conf).clamp(min=0).sum() / total) if total > 0 else math.nan
    tensors = {
        "bin_edges": bin_edges(p["n_bins"]).numpy(),
        "count": n.numpy(),
        "mean_confidence": torch.where(nonempty, conf / safe_n, nan).numpy(),
        "accuracy": torch.where(nonempty, correct / safe_n, nan).numpy(),
    }
    return Result({"value": over + under, "over_confidence": over, "under_confidence": under}, tensors, float(total), "samples")


def _binned(name: str, summary: str, params: tuple[Param, ...], finalize: Any, outputs: tuple[Output, ...], reference: str) -> FunctionDef:
    return register(
        FunctionDef(
            name=name,
            family="calibration",
            summary=summary,
            roles=ROLES,
            params=params + COMMON,
            outputs=outputs,
            fields={"bins": MergeOp.SUM},
            update=_bins_update,
            finalize=finalize,
            reference=reference,
            finalize_diagnostics=_empty_check,
        )
    )


ECE_OUTPUTS = (
    Output("value", "the calibration error"),
    Output("per_class", "classwise scope: each class's calibration error [K]", tensor=True),
)

ece = _binned(
    "ece",
    "expected calibration error over equal-width confidence bins (l1, l2 or max norm; top-label, positive-class or classwise)",
    (N_BINS, NORM, SCOPE),
    _finalize_ece,
    ECE_OUTPUTS,
    "uncertainty-calibration get_ece / lower_bound_scaling_ce with equal-width bins; float64 formula",
)

mce = _binned(
    "mce",
    "maximum calibration error: the largest |accuracy − confidence| over non-empty equal-width bins",
    (N_BINS, SCOPE),
    _finalize_ece,
    ECE_OUTPUTS,
    "float64 formula (ece with norm='max')",
)

debiased_ece = _binned(
    "debiased_ece",
    "Kumar et al. (2019) debiased L2 calibration error over equal-width bins (bins with n_b < 2 contribute 0)",
    (N_BINS, SCOPE_1D),
    _finalize_debiased,
    (Output("value", "sqrt(max(squared, 0))"), Output("squared", "the unbiased estimate of the squared L2 error (may be negative)")),
    "uncertainty-calibration unbiased_square_ce / lower_bound_scaling_ce(p=2, debias=True) with equal-width bins",
)

reliability_diagram = _binned(
    "reliability_diagram",
    "per-bin count, mean confidence and accuracy over equal-width bins, with the weighted over- and under-confidence gaps",
    (N_BINS, SCOPE_1D),
    _finalize_reliability,
    (
        Output("value", "the l1 ECE: over_confidence + under_confidence"),
        Output("over_confidence", "Σ_b (n_b/N)·max(conf_b − acc_b, 0)"),
        Output("under_confidence", "Σ_b (n_b/N)·max(acc_b − conf_b, 0)"),
        Output("bin_edges", "[B+1] edges b/B", tensor=True),
        Output("count", "[B] samples per bin", tensor=True),
        Output("mean_confidence", "[B] mean confidence per bin (NaN when empty)", tensor=True),
        Output("accuracy", "[B] accuracy per bin (NaN when empty)", tensor=True),
    ),
    "sklearn.calibration.calibration_curve(strategy='uniform') on non-empty bins",
)


# -- adaptive ECE: equal-mass bins --------------------------------------------


def equal_mass_ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> float:
    """Exact l1 ECE over equal-mass bins (Nixon et al. 2019), binned as uncertainty-calibration's get_equal_bins.

    The sorted confidences are split into min(B, N) parts as np.array_split
    does; edges are the midpoints between neighbouring parts (deduplicated),
    and a confidence equal to an edge goes to the bin below."""
    n = conf.numel()
    if n == 0:
        return math.nan
    b = min(n_bins, n)
    s = torch.sort(conf.to(F64)).values
    q, r = divmod(n, b)
    sizes = torch.full((b,), q, dtype=torch.int64, device=conf.device)
    sizes[:r] += 1
    ends = torch.cumsum(sizes, 0)[:-1]
    inner = (s[ends - 1] + s[ends]) / 2.0
    edges = torch.unique(torch.cat([inner, torch.ones(1, dtype=F64, device=conf.device)]))
    idx = torch.searchsorted(edges, conf.to(F64).contiguous(), right=False).clamp(max=edges.numel() - 1)
    sums = torch.zeros(edges.numel(), 3, dtype=F64, device=conf.device)
    sums.index_add_(0, idx, torch.stack([torch.ones_like(s), conf.to(F64), correct.to(F64)], 1))
    return float(_calibration_error(sums.cpu(), "l1"))


def histogram_adaptive_ece(hist: torch.Tensor, n_bins: int) -> float:
    """Equal-mass ECE estimated from fine equal-width bins [H, 3].

    Each fine bin goes whole to the equal-mass bin holding the quantile of
    its middle sample, floor((c_before + n_j/2)·B/N) with B = min(n_bins, N);
    exact when no fine bin straddles an equal-mass boundary."""
    n = hist[:, 0]
    total = float(n.sum())
    if total == 0:
        return math.nan
    b = min(n_bins, int(total))
    before = torch.cumsum(n, 0) - n
    coarse = torch.floor((before + n / 2) * b / total).clamp(0, b - 1).to(torch.int64)
    sums = torch.zeros(b, 3, dtype=F64)
    sums.index_add_(0, coarse, hist.to(F64))
    return float(_calibration_error(sums, "l1"))


def _adaptive_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    conf, correct = (_positive_class if p["scope"] == "positive_class" else _top_label)(view, p)
    exact = equal_mass_ece(conf, correct, p["n_bins"])
    nonempty = conf.numel() > 0
    return {
        "histogram": bin_sums(conf, correct, ADAPTIVE_HISTOGRAM_BINS),
        "exact": torch.tensor(exact if nonempty else 0.0, dtype=F64),
        "nonempty_updates": torch.tensor(float(nonempty), dtype=F64),
    }


def _adaptive_is_exact(fields: Mapping[str, torch.Tensor]) -> bool:
    # "exact" sums the exact values of the updates that held data: it is the
    # value itself only when at most one of them did.
    return float(fields["nonempty_updates"]) <= 1


def _finalize_adaptive(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    hist = fields["histogram"]
    total = float(hist[:, 0].sum())
    binned = histogram_adaptive_ece(hist, p["n_bins"])
    exact = _adaptive_is_exact(fields)
    value = (float(fields["exact"]) if total > 0 else math.nan) if exact else binned
    return Result({"value": value, "exact": float(exact), "histogram_value": binned}, denominator=total, denominator_kind="samples")


def _adaptive_diagnostics(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    if float(fields["histogram"][:, 0].sum()) == 0:
        return [("all_ignored", "no sample was binned (all labels ignored or an empty batch); the value is NaN with denominator 0")]
    if not _adaptive_is_exact(fields):
        return [
            (
                "binned_estimate",
                f"adaptive_ece over {int(float(fields['nonempty_updates']))} merged batches is estimated from a "
                f"{ADAPTIVE_HISTOGRAM_BINS}-bin confidence histogram; send the data in one request for the exact value",
            )
        ]
    return []


adaptive_ece = register(
    FunctionDef(
        name="adaptive_ece",
        family="calibration",
        summary="l1 calibration error over equal-mass bins; exact within one request, from a 1000-bin histogram across merged batches",
        roles=ROLES,
        params=(N_BINS, SCOPE_1D) + COMMON,
        outputs=(
            Output("value", "the adaptive ECE: exact for one request, else the histogram estimate"),
            Output("exact", "1.0 when value is exact, 0.0 when it is the histogram estimate"),
            Output("histogram_value", f"the estimate from the {ADAPTIVE_HISTOGRAM_BINS}-bin histogram, always given"),
        ),
        fields={"histogram": MergeOp.SUM, "exact": MergeOp.SUM, "nonempty_updates": MergeOp.SUM},
        update=_adaptive_update,
        finalize=_finalize_adaptive,
        reference="uncertainty-calibration get_ece_em (equal-mass bins, get_equal_bins); float64 histogram formula across batches",
        finalize_diagnostics=_adaptive_diagnostics,
    )
)


# -- temperature ----------------------------------------------------------------


def temperature_grid(p: Mapping[str, Any]) -> torch.Tensor:
    """The fixed log-spaced grid of temperatures, float64 [G]."""
    return torch.exp(torch.linspace(math.log(p["t_min"]), math.log(p["t_max"]), p["grid_points"], dtype=F64))


def _softplus(v: torch.Tensor) -> torch.Tensor:
    """log(1 + e^v), exact at ±inf."""
    return v.clamp(min=0) + torch.log1p(torch.exp(-v.abs()))


def _binary_nll(s: _Binary, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ NLL of σ(z/T) per grid point, and Σ NLL at T = 1."""
    sign = 2 * s.targets - 1
    curve = torch.zeros(inverse.numel(), dtype=F64, device=inverse.device)
    step = max(1, _TEMPERATURE_BLOCK // inverse.numel())
    for start in range(0, s.logit.numel(), step):
        v = -(sign[start : start + step, None] * s.logit[start : start + step, None]) * inverse[None, :]
        curve += _softplus(v).sum(0)
    return curve, _softplus(-sign * s.logit).sum()


def _multiclass_nll(view: View, s: _Multiclass, inverse: torch.Tensor, input_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i [lse(z_i/T) − z_{i,y}/T] per grid point, from max-shifted rows, and Σ NLL at T = 1."""
    dtype = compute_dtype(s.scores.dtype)
    g, k = inverse.numel(), s.num_classes
    curve = torch.zeros(g, dtype=F64, device=inverse.device)
    g_step = max(1, min(g, _TEMPERATURE_BLOCK // k))
    for first, rows in iter_row_chunks(s.scores, 1):
        part = slice(first, first + rows.shape[0])
        valid = s.valid[part]
        rows = rows[valid].to(dtype)
        labels = s.labels[part][valid]
        shifted = rows - rows.max(dim=1, keepdim=True).values  # <= 0: exp never overflows
        label_gap = -shifted.gather(1, labels[:, None])  # max − z_y >= 0
        r_step = max(1, _TEMPERATURE_BLOCK // (g_step * k))
        for r in range(0, rows.shape[0], r_step):
            block = shifted[r : r + r_step]
            for j in range(0, g, g_step):
                inv = inverse[j : j + g_step].to(dtype)
                # The row max is 0 after the shift, so Σ exp >= 1: no overflow, no log(0).
                lse = (block[:, None, :] * inv[None, :, None]).exp_().sum(dim=2).log_()
                curve[j : j + g_step] += (label_gap[r : r + r_step] * inv[None, :] + lse).to(F64).sum(0)
    stats = view.row_stats("logits", 1, input_kind=input_kind)
    labels = s.labels.reshape(stats.lse.shape)
    z_y = s.scores.gather(1, labels.unsqueeze(1)).squeeze(1).reshape(-1)[s.valid]
    at_one = (stats.lse.reshape(-1)[s.valid] - z_y.to(stats.lse.dtype)).to(F64).sum()
    return curve, at_one


def _temperature_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not p["t_min"] < p["t_max"]:
        raise view.param_error("t_max", f"expected t_max > t_min={p['t_min']!r}, got {p['t_max']!r}")
    s = _read(view, p)
    inverse = (1 / temperature_grid(p)).to(view.batch.device)
    if isinstance(s, _Binary):
        curve, at_one = _binary_nll(s, inverse)
        count = s.logit.numel()
    else:
        curve, at_one = _multiclass_nll(view, s, inverse, p["input_kind"])
        count = int(s.valid.sum())
    return {"nll": curve, "nll_at_1": at_one.reshape(()), "count": torch.tensor(float(count), dtype=F64)}


def _parabola_vertex(u: torch.Tensor, f: torch.Tensor, g: int) -> tuple[float, float]:
    """Vertex (u*, f*) of the parabola through grid points g−1, g, g+1 (uniform spacing in u)."""
    h = float(u[1] - u[0])
    fm, f0, fp = float(f[g - 1]), float(f[g]), float(f[g + 1])
    curvature = fp - 2 * f0 + fm
    if not curvature > 0:
        return float(u[g]), f0
    shift = 0.5 * (fm - fp) / curvature  # in grid steps, within [-1/2, 1/2] at a grid minimum
    return float(u[g]) + shift * h, f0 - (fp - fm) ** 2 / (8 * curvature)


def _finalize_temperature(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    count = float(fields["count"])
    grid = temperature_grid(p)
    curve = fields["nll"] / count if count else torch.full_like(grid, math.nan)
    tensors = {"temperatures": grid.numpy(), "nll_curve": curve.numpy()}
    if not bool(torch.isfinite(curve).all()):
        # No samples, NaN scores, or a label of probability 0 (NLL inf at every T): no optimum.
        nan = math.nan
        at_one = float(fields["nll_at_1"]) / count if count else nan
        return Result({"value": nan, "nll": nan, "nll_at_1": at_one, "at_grid_edge": nan}, tensors, count, "samples")
    g = int(torch.argmin(curve))  # the first minimum
    edge = g in (0, grid.numel() - 1)
    if edge:
        t, nll = float(grid[g]), float(curve[g])
    else:
        u_star, nll = _parabola_vertex(torch.log(grid), curve, g)
        t = math.exp(u_star)
    values = {"value": t, "nll": nll, "nll_at_1": float(fields["nll_at_1"]) / count, "at_grid_edge": float(edge)}
    return Result(values, tensors, count, "samples")


def _temperature_diagnostics(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    if float(fields["count"]) == 0:
        return [("all_ignored", "no sample was seen (all labels ignored or an empty batch); the temperature is NaN")]
    return []


temperature = register(
    FunctionDef(
        name="temperature",
        family="calibration",
        summary="the NLL-optimal temperature T of softmax(logits / T) (σ(z / T) for binary), from summed NLL on a fixed log-spaced grid",
        roles=ROLES,
        params=(
            Param("t_min", "float", 0.05, "smallest temperature of the grid", minimum=0.0, exclusive_minimum=True),
            Param("t_max", "float", 20.0, "largest temperature of the grid (> t_min)", minimum=0.0, exclusive_minimum=True),
            Param(
                "grid_points", "int", 256, "grid size G: temperatures t_min·(t_max/t_min)^(g/(G−1)), g = 0..G−1", minimum=3, maximum=4096
            ),
        )
        + COMMON,
        outputs=(
            Output("value", "the temperature: the grid minimum of the mean NLL, refined by a parabola in log T through its neighbours"),
            Output(
                "nll",
                "mean NLL at that temperature, interpolated by the parabola through the grid minimum and its neighbours (an estimate; nll_curve holds the exact grid values)",
            ),
            Output("nll_at_1", "mean NLL at T = 1 (the uncalibrated scores)"),
            Output("at_grid_edge", "1.0 when the minimum lies at t_min or t_max: widen the grid"),
            Output("temperatures", "[G] the grid", tensor=True),
            Output("nll_curve", "[G] mean NLL at each grid temperature", tensor=True),
        ),
        fields={"nll": MergeOp.SUM, "nll_at_1": MergeOp.SUM, "count": MergeOp.SUM},
        update=_temperature_update,
        finalize=_finalize_temperature,
        reference="scipy.optimize.minimize_scalar on the float64 NLL of logits / T",
        finalize_diagnostics=_temperature_diagnostics,
    )
)
