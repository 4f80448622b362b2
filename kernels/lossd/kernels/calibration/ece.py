"""The ECE family: ECE, MCE, debiased ECE, the reliability diagram and adaptive (equal-mass) ECE.

Every statistic here reads the pooled bins of :mod:`lossd.kernels.calibration.bins`,
so the ECE of a whole evaluation set is the ECE of its pooled bins, never a
mean of batch ECEs.  ``adaptive_ece`` (equal-mass bins) cannot be merged
exactly; its state holds both the exact value of one update and a fine
1000-bin histogram, and says in its output which one it used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.budget import calibration_bins
from lossd.kernels.calibration.bins import (
    ADAPTIVE_HISTOGRAM_BINS,
    COMMON,
    EXAMPLE,
    F64,
    N_BINS,
    NORM,
    ROLES,
    SCOPE,
    SCOPE_1D,
    BinaryScores,
    bin_edges,
    bin_sums,
    class_probabilities,
    edge_precision,
    positive_class,
    read_scores,
    top_label,
)
from lossd.kernels.declarations import FunctionDef, Output, Result, no_valid_element
from lossd.kernels.params import Param
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "equal_mass_ece", "histogram_adaptive_ece"]

# Elements of one [rows, classes] block of classwise binning (about ten temporaries each).
CLASSWISE_BLOCK = 1 << 22


def _classwise_sums(view: View, p: Mapping[str, Any], n_bins: int) -> torch.Tensor:
    """[K, B, 3] bins of every class probability p_k against [y = k]."""
    s = read_scores(view, p)
    k = 2 if isinstance(s, BinaryScores) else s.num_classes
    out = torch.zeros(k, n_bins, 3, dtype=F64, device=view.batch.device)
    classes = torch.arange(k, device=view.batch.device)
    for probs, labels in class_probabilities(view, s, p["input_kind"], max(1, CLASSWISE_BLOCK // k)):
        hit = labels[:, None] == classes[None, :]
        out += bin_sums(probs, hit, n_bins, group=classes.expand_as(probs), groups=k, precision=edge_precision(view, p))
    return out


def _bins_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    scope = p.get("scope", "top_label")
    if scope == "classwise":
        return {"bins": _classwise_sums(view, p, p["n_bins"])}
    conf, correct = (positive_class if scope == "positive_class" else top_label)(view, p)
    return {"bins": bin_sums(conf, correct, p["n_bins"], precision=edge_precision(view, p))}


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


_NOTHING_BINNED = "no sample was binned (all labels ignored or an empty batch); the value is NaN with denominator 0"


def _count(fields: Mapping[str, torch.Tensor]) -> float:
    return float(fields["bins"][..., 0].sum(-1).reshape(-1)[0]) if fields["bins"].numel() else 0.0


def _empty_check(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    return no_valid_element(_count(fields), _NOTHING_BINNED)


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
    """A statistic of the pooled equal-width bins: the variants differ in ``finalize`` (and their parameters)."""
    return FunctionDef(
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
        example=EXAMPLE,
        finalize_diagnostics=_empty_check,
        memory=calibration_bins,
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
    conf, correct = (positive_class if p["scope"] == "positive_class" else top_label)(view, p)
    exact = equal_mass_ece(conf, correct, p["n_bins"])
    nonempty = conf.numel() > 0
    return {
        "histogram": bin_sums(conf, correct, ADAPTIVE_HISTOGRAM_BINS, precision=edge_precision(view, p)),
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
    empty = no_valid_element(float(fields["histogram"][:, 0].sum()), _NOTHING_BINNED)
    if empty:
        return empty
    if not _adaptive_is_exact(fields):
        return [
            (
                "binned_estimate",
                f"adaptive_ece over {int(float(fields['nonempty_updates']))} merged batches is estimated from a "
                f"{ADAPTIVE_HISTOGRAM_BINS}-bin confidence histogram; send the data in one request for the exact value",
            )
        ]
    return []


adaptive_ece = FunctionDef(
    name="adaptive_ece",
    family="calibration",
    summary=(
        "l1 calibration error over equal-mass bins; not splittable: a request's batch is evaluated whole (the client never "
        "splits it, the server refuses parts), so one request is exact; across merged batches (streams, runs) the value "
        "comes from a 1000-bin histogram and says so (exact=0, binned_estimate)"
    ),
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
    example=EXAMPLE,
    # Equal-mass edges depend on every confidence of the batch: parts merged from a
    # split batch would silently give the histogram estimate instead of the exact value.
    splittable=False,
)

FUNCTIONS = (ece, mce, debiased_ece, reliability_diagram, adaptive_ece)
