"""Ranking-curve metrics: AUROC and average precision, exact or from histograms.

Exact values keep every valid score and label in the state (CONCAT, bounded
by the server's exact-state limit) and compute the curves with ties grouped as
sklearn does; ``bins=T`` keeps a T-bin probability histogram of positives and
negatives per class instead, which merges by addition (approximate, and
reported as such with the ``binned_estimate`` diagnostic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.budget import rank_histogram
from lossd.kernels.chunks import iter_class_last_chunks
from lossd.kernels.declarations import FunctionDef, Output, Result
from lossd.kernels.losses.classification import INPUT_KIND
from lossd.kernels.metrics.scores import (
    LABELS,
    LOGITS,
    MULTICLASS_EXAMPLE,
    TARGETS,
    binary_inputs,
    binary_log_probs,
    is_binary,
    multiclass,
    nan_average,
)
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "exact_rank_scores", "binned_rank_scores"]

BINS = Param(
    "bins",
    "int",
    None,
    "None: exact (the state keeps every score, bounded by the server's exact-state limit); "
    "T: a T-bin histogram of probabilities per class (mergeable, approximate)",
    nullable=True,
    minimum=2,
    maximum=100_000,  # a finer histogram than this is the exact computation's job (bins=None)
)


# -- AUROC and average precision -------------------------------------------------------------------
def _tie_groups(sorted_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position (within its row) of each element's tie group, for rows sorted ascending."""
    c, n = sorted_scores.shape
    starts = torch.ones_like(sorted_scores, dtype=torch.bool)
    starts[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    group = torch.cumsum(starts.reshape(-1), 0) - 1  # unique across rows: every row starts a group
    position = torch.arange(n, device=sorted_scores.device).repeat(c)
    groups = int(group[-1]) + 1
    first = torch.full((groups,), n, dtype=torch.int64, device=group.device).scatter_reduce(0, group, position, "amin")
    last = torch.full((groups,), -1, dtype=torch.int64, device=group.device).scatter_reduce(0, group, position, "amax")
    return first[group].reshape(c, n), last[group].reshape(c, n)


def exact_rank_scores(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(AUROC, AP) per column of scores [N, C] with boolean truth [N, C]; NaN where undefined.

    AUROC is the Mann–Whitney statistic with mid-ranks for ties (sklearn's
    roc_auc_score); AP is Σ over positives of the precision at its score's
    threshold, tied scores forming one threshold (sklearn's average_precision_score)."""
    n, c = scores.shape
    pos_count = positive.sum(0).to(torch.float64)
    neg_count = n - pos_count
    undefined = (pos_count == 0) | (neg_count == 0) | torch.isnan(scores).any(0)
    if n == 0:
        nan = torch.full((c,), math.nan, dtype=torch.float64)
        return nan, nan.clone()
    ordered, order = torch.sort(scores.t(), dim=1, stable=True)
    pos = positive.t().gather(1, order).to(torch.float64)
    first, last = _tie_groups(ordered)
    midrank = (first + last).to(torch.float64) / 2 + 1
    rank_sum = (pos * midrank).sum(1)
    auc = (rank_sum - pos_count * (pos_count + 1) / 2) / (pos_count * neg_count)
    positives_before = torch.cumsum(pos, dim=1) - pos
    at_or_above = n - first  # elements scoring >= this element's score
    true_at_or_above = pos_count[:, None] - positives_before.gather(1, first)
    ap = (pos * true_at_or_above / at_or_above).sum(1) / pos_count
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return torch.where(undefined, nan, auc), torch.where(undefined, nan, ap)


def binned_rank_scores(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(AUROC, AP) per class from histograms [C, T] of positives / negatives per score bin.

    Each bin is one tied score: the values equal sklearn's on scores quantized to their bin."""
    pos_count, neg_count = pos.sum(1), neg.sum(1)
    pos_above = pos.flip(1).cumsum(1).flip(1) - pos  # positives in strictly higher bins
    auc = (neg * (pos_above + pos / 2)).sum(1) / (pos_count * neg_count)
    tp = pos_above + pos
    fp = neg.flip(1).cumsum(1).flip(1)
    precision = torch.where(tp + fp > 0, tp / torch.where(tp + fp > 0, tp + fp, torch.ones_like(tp)), torch.zeros_like(tp))
    ap = (pos * precision).sum(1) / pos_count
    undefined = (pos_count == 0) | (neg_count == 0)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return torch.where(undefined, nan, auc), torch.where(undefined, nan, ap)


def _ovr_scores(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-class scores [M, K] in float64 that rank rows as sklearn's probabilities do.

    Logits: log-softmax (ties in softmax underflow are avoided); probs and
    log_probs: as given, not renormalized."""
    rows = rows.to(torch.float64)
    return torch.log_softmax(rows, dim=1) if kind == "logits" else rows


def _probabilities(scores: torch.Tensor, kind: str, *, binary: bool) -> torch.Tensor:
    """Probabilities from float64 scores: σ(z) for binary logits, exp of log-softmax / log-probs, probs as given."""
    if kind == "probs":
        return scores
    if kind == "logits":
        return torch.sigmoid(scores) if binary else torch.exp(scores)
    return torch.exp(scores)


def _validate_kind(view: View, kind: str, binary: bool) -> None:
    """Refuse scores that are not what input_kind says, as every other function of the request does.

    For multiclass logits the shared row statistics also raise probabilities_as_logits
    (one-vs-rest AUROC changes when probabilities are softmaxed again)."""
    if not binary:
        view.row_stats("logits", 1, input_kind=kind)  # probs: [0, 1], rows summing to 1 (shared, memoized)
        return
    if kind == "logits":
        return
    elif kind == "probs":
        view.log_space("logits", kind)  # refuses values outside [0, 1]
    else:
        binary_log_probs(view, kind)  # refuses positive values


def _bin_counts(prob: torch.Tensor, positive: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positives and negatives per (class, bin) [K, T], and the count of rows with a NaN probability (left out).

    Bin b holds (b/T, (b+1)/T]; bin 0 also holds 0 (the calibration bins' edge rule)."""
    k = prob.shape[1]
    nan_rows = torch.isnan(prob).any(1)
    prob, positive = prob[~nan_rows], positive[~nan_rows]
    cell = (torch.ceil(prob * bins) - 1).clamp(0, bins - 1).to(torch.int64) + torch.arange(k, device=prob.device) * bins
    pos = torch.bincount(cell[positive], minlength=k * bins).reshape(k, bins)
    neg = torch.bincount(cell[~positive], minlength=k * bins).reshape(k, bins)
    return pos.to(torch.float64), neg.to(torch.float64), nan_rows.sum().to(torch.float64)


def _rank_state(
    scores: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, nan_rows: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {"scores": scores, "labels": labels, "positives": pos, "negatives": neg, "nan_rows": nan_rows}


def _rank_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Exact: the valid rows' scores and labels (CONCAT); binned: per-class histograms (SUM)."""
    kind, bins = p["input_kind"], p["bins"]
    binary = is_binary(view)
    if binary:
        z, y = binary_inputs(view)
        _validate_kind(view, kind, binary)
        scores, labels = z.to(torch.float64), y.to(torch.int64)
        if bins is None:
            return _rank_state(scores, labels, scores[:0], scores[:0], torch.isnan(scores).sum().to(torch.float64))
        pos, neg, nan_rows = _bin_counts(_probabilities(scores, kind, binary=True)[:, None], (labels == 1)[:, None], bins)
        return _rank_state(scores[:0], labels[:0], pos[0], neg[0], nan_rows)
    z, y, valid = multiclass(view, p)
    _validate_kind(view, kind, binary)
    k = z.shape[1]
    flat_y, flat_valid = y.reshape(-1), valid.reshape(-1)
    if bins is None:
        scores = _ovr_scores(z.movedim(1, -1).reshape(-1, k), kind)[flat_valid]
        empty = torch.zeros(0, dtype=torch.float64, device=z.device)
        return _rank_state(scores, flat_y[flat_valid], empty, empty, torch.isnan(scores).any(1).sum().to(torch.float64))
    pos = torch.zeros(k, bins, dtype=torch.float64, device=z.device)
    neg = torch.zeros_like(pos)
    nan_rows = torch.zeros((), dtype=torch.float64, device=z.device)
    classes = torch.arange(k, device=z.device)
    row = 0
    for _, _, rows in iter_class_last_chunks(z, 1):  # bounded memory: the histogram is the whole state
        m = rows.shape[0]
        keep = flat_valid[row : row + m]
        prob = _probabilities(_ovr_scores(rows[keep], kind), kind, binary=False)
        chunk = _bin_counts(prob, flat_y[row : row + m][keep, None] == classes, bins)
        pos, neg, nan_rows = pos + chunk[0], neg + chunk[1], nan_rows + chunk[2]
        row += m
    return _rank_state(torch.zeros(0, k, dtype=torch.float64), torch.zeros(0, dtype=torch.int64), pos, neg, nan_rows)


def _rank_values(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """(per-class AUROC, per-class AP, rows, binary) from exact scores or histograms; all NaN if a score was NaN."""
    nan_rows = float(fields["nan_rows"])
    if p["bins"] is None:
        scores, labels = fields["scores"], fields["labels"]
        binary = scores.ndim == 1
        columns = scores[:, None] if binary else scores
        positive = (labels == 1)[:, None] if binary else labels[:, None] == torch.arange(scores.shape[1])
        auc, ap = exact_rank_scores(columns, positive)
        rows = scores.shape[0]
    else:
        pos, neg = fields["positives"], fields["negatives"]
        binary = pos.ndim == 1
        pos2, neg2 = (pos[None], neg[None]) if binary else (pos, neg)
        auc, ap = binned_rank_scores(pos2, neg2)
        rows = int((pos2[0] + neg2[0]).sum() + nan_rows)
    if nan_rows:
        auc, ap = torch.full_like(auc, math.nan), torch.full_like(ap, math.nan)
    return auc, ap, rows, binary


def _rank_finalize(which: str) -> Any:
    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        auc, ap, rows, binary = _rank_values(fields, p)
        per_class = auc if which == "auroc" else ap
        values = {"value": nan_average(per_class, None), "exact": 1.0 if p["bins"] is None else 0.0}
        tensors = {} if binary else {"per_class": per_class.numpy()}
        return Result(values, tensors, denominator=float(rows), denominator_kind="samples")

    return finalize


def _classes_present(fields: Mapping[str, Any], p: Mapping[str, Any]) -> int:
    if p["bins"] is None:
        labels = fields["labels"]
        return int(torch.unique(labels).numel())
    pos = fields["positives"]
    if pos.ndim == 1:
        return int(float(pos.sum()) > 0) + int(float(fields["negatives"].sum()) > 0)
    return int((pos.sum(1) > 0).sum())


def _rank_diagnostics(fields: Mapping[str, Any], p: Mapping[str, Any]) -> list[tuple[str, str]]:
    found = []
    present = _classes_present(fields, p)
    if present < 2:
        found.append(
            ("single_class_auroc", f"{present} class(es) present in the labels; AUROC and average precision need two (the value is NaN)")
        )
    if p["bins"] is not None:
        found.append(("binned_estimate", f"computed from a {p['bins']}-bin probability histogram (approximate; bins=None is exact)"))
    return found


def _rank_metric(name: str, summary: str, reference: str) -> FunctionDef:
    """AUROC or average precision: the two differ only in the curve ``name`` finalizes."""
    return FunctionDef(
        name=name,
        family="metric",
        summary=summary,
        roles=(LOGITS, LABELS, TARGETS),
        params=(BINS, IGNORE_INDEX, INPUT_KIND),
        outputs=(
            Output("value", "binary value, or one-vs-rest macro mean over classes present (NaN with fewer than two classes)"),
            Output("exact", "1.0 when computed from exact scores, 0.0 when from the bins histogram"),
            Output("per_class", "multiclass only: one-vs-rest value per class [K] (NaN for classes absent from labels)", tensor=True),
        ),
        fields={
            "scores": MergeOp.CONCAT,
            "labels": MergeOp.CONCAT,
            "positives": MergeOp.SUM,
            "negatives": MergeOp.SUM,
            "nan_rows": MergeOp.SUM,
        },
        update=_rank_update,
        finalize=_rank_finalize(name),
        reference=reference,
        finalize_diagnostics=_rank_diagnostics,
        memory=rank_histogram,
        example=MULTICLASS_EXAMPLE,
    )


auroc = _rank_metric(
    "auroc",
    "area under the ROC curve: binary, or one-vs-rest macro over softmax probabilities; exact or binned (bins=T)",
    "sklearn.metrics.roc_auc_score (multi_class='ovr', average='macro')",
)
average_precision = _rank_metric(
    "average_precision",
    "average precision (area under the step precision-recall curve): binary or one-vs-rest macro; exact or binned",
    "sklearn.metrics.average_precision_score",
)

FUNCTIONS = (auroc, average_precision)
