"""The accuracy family: accuracy, top-k accuracy, precision, recall, F1 and the confusion matrix.

Accuracy is a weighted mean of per-element hits (:func:`~lossd.kernels.reduce.mean_loss`
without ``reduction``); precision, recall and F1 finalize a K×K confusion
matrix of Σ weights, which merges by addition, so every average (macro,
micro, weighted, none) is exact over streams and ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.budget import confusion
from lossd.kernels.chunks import iter_class_last_chunks
from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role
from lossd.kernels.examples import K, normal
from lossd.kernels.examples import class_labels as example_labels
from lossd.kernels.losses.classification import INPUT_KIND, labels_all_valid
from lossd.kernels.metrics.scores import (
    LABELS,
    LOGITS,
    MULTICLASS_EXAMPLE,
    TARGETS,
    THRESHOLD,
    diagnose_imbalance,
    is_binary,
    multiclass,
    nan_average,
    truth_and_predictions,
)
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.reduce import WEIGHTS_ROLE, Terms, mean_loss
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "MAX_CONFUSION_CLASSES"]

AVERAGE = Param(
    "average",
    "str",
    "macro",
    "macro: unweighted mean over classes present in labels ∪ predictions; micro: from global counts; "
    "weighted: mean weighted by support; none: a [K] tensor per class",
    choices=("macro", "micro", "weighted", "none"),
)
ZERO_DIVISION = Param(
    "zero_division", "str", "0", "value of a ratio whose denominator is 0 (0, 1 or nan, as sklearn)", choices=("0", "1", "nan")
)

# The K×K confusion state of precision / recall / f1 / confusion_matrix: 4096² float64 is 128 MiB.
MAX_CONFUSION_CLASSES = 4096

CONFUSION_FIELDS = {"matrix": MergeOp.SUM, "count": MergeOp.SUM}  # K×K Σ weights; elements of non-zero weight


def _terms(values: torch.Tensor, valid: torch.Tensor) -> Terms:
    """Per-element metric values over valid elements, in float64 (the optional sample weights are applied by mean_loss)."""
    return Terms(values.to(torch.float64), valid)


# More classes than the default k=5: the clean example must not raise top_k_covers_all_classes.
TOP_K_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, 2 * K), "labels": example_labels(n, 2 * K)})


# -- accuracy --------------------------------------------------------------------------------------
def _accuracy_terms(view: View, p: Mapping[str, Any]) -> Terms:
    y, pred, valid, k = truth_and_predictions(view, p)
    diagnose_imbalance(view, y, valid, k)
    correct = (pred == y).to(torch.float64)
    # A row with NaN or inf scores has no meaningful prediction: it makes the value NaN
    # (as it does for the losses) instead of being scored by where argmax lands.
    binary = is_binary(view)
    finite: torch.Tensor | None
    if binary:
        finite = torch.isfinite(view.scores("logits"))
    else:
        stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
        # The CPU row pass proved every score finite: the mask would be all True (three ops saved).
        finite = None if stats.finite else torch.isfinite(stats.lse)
    if finite is not None:
        correct = torch.where(finite, correct, torch.full_like(correct, math.nan))
    # Every label valid (binary: always): no weights, so the mean sums the terms as they are
    # (mean_loss's unit-weight path: Σ 1·c and Σ 1 are the same numbers, without seven ops).
    if binary or labels_all_valid(view, view.scores("logits"), p["ignore_index"]):
        return Terms(correct)
    return Terms(correct, valid)


def _diagnose_k_covers_all(view: View, top: int, classes: int) -> None:
    """top_k_covers_all_classes: with k >= K every label is among the top k, so the value (1.0) says nothing.

    scikit-learn's top_k_accuracy_score warns the same; the value is still computed, not refused,
    because a sweep over k or a model with few classes can ask for it on purpose."""
    if top >= classes:
        view.diag(
            "top_k_covers_all_classes",
            f"k={top} >= the {classes} classes of {view.tensor_name('logits')!r}: every valid label is among the top {top}, "
            f"so the value is 1.0 whatever the scores; pass k < {classes} (k=1 is accuracy)",
        )


def _top_k_terms(view: View, p: Mapping[str, Any]) -> Terms:
    """Correct when fewer than k classes outrank the label; ties go to the lower class index, as argmax."""
    z, y, valid = multiclass(view, p)
    k = z.shape[1]
    _diagnose_k_covers_all(view, p["k"], k)
    ranks = torch.empty(y.numel(), dtype=torch.int64, device=z.device)
    flat_y = y.reshape(-1)
    columns = torch.arange(k, device=z.device)
    row = 0
    for _, _, rows in iter_class_last_chunks(z, 1):
        m = rows.shape[0]
        label = flat_y[row : row + m, None]
        score = rows.gather(1, label)
        ahead = (rows > score) | ((rows == score) & (columns < label))
        ranks[row : row + m] = ahead.sum(dim=1)
        row += m
    return _terms(ranks.reshape(y.shape) < p["k"], valid)


accuracy = mean_loss(
    name="accuracy",
    family="metric",
    summary="share of correct top-1 predictions (binary: logit > threshold)",
    roles=(LOGITS, LABELS, TARGETS),
    params=(IGNORE_INDEX, THRESHOLD, INPUT_KIND),
    terms=_accuracy_terms,
    reference="sklearn.metrics.accuracy_score",
    example=MULTICLASS_EXAMPLE,
    reduction=False,
    doc="Σ w·[prediction = label] / Σ w",
)

top_k_accuracy = mean_loss(
    name="top_k_accuracy",
    family="metric",
    summary=(
        "share of labels among the k highest-scoring classes; score ties are broken by the lower class index "
        "(scikit-learn's top_k_accuracy_score ranks the higher index first, so values differ on ties)"
    ),
    roles=(
        Role("logits", "[N, K] or [N, K, d1, ...]", "float", "class scores"),
        Role("labels", "[N] or [N, d1, ...]", "index", "class indices or ignore_index"),
    ),
    params=(
        Param(
            "k",
            "int",
            5,
            "how many top classes count as a hit (k >= K: every valid element is a hit, diagnosed as top_k_covers_all_classes)",
            minimum=1,
        ),
        IGNORE_INDEX,
    ),
    terms=_top_k_terms,
    reference="sklearn.metrics.top_k_accuracy_score on tie-free inputs",
    example=TOP_K_EXAMPLE,
    reduction=False,
    doc="Σ w·[rank of label < k] / Σ w",
)


# -- confusion-matrix family -----------------------------------------------------------------------
def _confusion_update(view: View, p: Mapping[str, Any], *, diagnose: bool) -> dict[str, torch.Tensor]:
    y, pred, valid, k = truth_and_predictions(view, p)
    if k > MAX_CONFUSION_CLASSES:
        raise view.error("logits", f"the confusion-matrix state is K×K; K={k} is over the limit of {MAX_CONFUSION_CLASSES} classes")
    if diagnose:
        diagnose_imbalance(view, y, valid, k)
    w = valid.to(torch.float64)
    sw = view.sample_weights(y.shape, torch.float64)
    if sw is not None:
        w = w * sw
    cells = (y * k + pred).reshape(-1)
    matrix = torch.bincount(cells, weights=w.reshape(-1), minlength=k * k).reshape(k, k)
    return {"matrix": matrix.to(torch.float64), "count": (w != 0).sum().to(torch.float64)}


def _confusion_denominator(fields: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """(Σ weights, "samples" or "weights"), as mean losses report theirs."""
    total = float(fields["matrix"].sum())
    return total, "samples" if total == float(fields["count"]) else "weights"


def _zero_division(p: Mapping[str, Any]) -> float:
    return {"0": 0.0, "1": 1.0, "nan": math.nan}[p["zero_division"]]


def _ratio(num: torch.Tensor, den: torch.Tensor, zero_division: float) -> torch.Tensor:
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, num / safe, torch.full_like(num, zero_division))


def _class_scores(which: str, tp: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor, zero_division: float) -> torch.Tensor:
    if which == "precision":
        return _ratio(tp, predicted, zero_division)
    if which == "recall":
        return _ratio(tp, true, zero_division)
    return _ratio(2 * tp, true + predicted, zero_division)  # F1 = 2tp / (2tp + fp + fn)


def _prf_finalize(which: str) -> Any:
    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        matrix = fields["matrix"]
        tp, predicted, true = matrix.diagonal(), matrix.sum(0), matrix.sum(1)
        zd = _zero_division(p)
        total, kind = _confusion_denominator(fields)
        if p["average"] == "none":
            per_class = _class_scores(which, tp, predicted, true, zd)
            return Result(tensors={"value": per_class.numpy(), "support": true.numpy()}, denominator=total, denominator_kind=kind)
        if p["average"] == "micro":
            value = float(_class_scores(which, tp.sum()[None], predicted.sum()[None], true.sum()[None], zd)[0])
        else:
            present = (true + predicted) > 0
            per_class = _class_scores(which, tp, predicted, true, zd)[present]
            value = nan_average(per_class, true[present] if p["average"] == "weighted" else None)
        return Result({"value": value}, denominator=total, denominator_kind=kind)

    return finalize


def _prf_metric(which: str, formula: str) -> FunctionDef:
    """precision, recall or f1 from the confusion state: the three differ only in ``which``."""
    return FunctionDef(
        name=which,
        family="metric",
        summary=f"{which} ({formula}) from a K×K confusion matrix; binary inputs count as K = 2",
        roles=(LOGITS, LABELS, TARGETS, WEIGHTS_ROLE),
        params=(AVERAGE, ZERO_DIVISION, IGNORE_INDEX, THRESHOLD, INPUT_KIND),
        outputs=(
            Output("value", f"averaged {which}; for average='none' a [K] tensor over all classes (absent ones get zero_division)"),
            Output("support", "average='none' only: true count per class [K]", tensor=True),
        ),
        fields=CONFUSION_FIELDS,
        update=lambda view, p: _confusion_update(view, p, diagnose=True),
        finalize=_prf_finalize(which),
        memory=confusion,
        reference="sklearn.metrics.precision_recall_fscore_support",
        example=MULTICLASS_EXAMPLE,
    )


precision = _prf_metric("precision", "tp / (tp + fp)")
recall = _prf_metric("recall", "tp / (tp + fn)")
f1 = _prf_metric("f1", "2tp / (2tp + fp + fn)")


def _confusion_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    total, kind = _confusion_denominator(fields)
    return Result(tensors={"value": fields["matrix"].numpy()}, denominator=total, denominator_kind=kind)


confusion_matrix = FunctionDef(
    name="confusion_matrix",
    family="metric",
    summary="K×K counts (rows: true class, columns: predicted class); binary inputs give 2×2",
    roles=(LOGITS, LABELS, TARGETS, WEIGHTS_ROLE),
    params=(IGNORE_INDEX, THRESHOLD, INPUT_KIND),
    outputs=(Output("value", "[K, K] counts (Σ weights when weighted), float64", tensor=True),),
    fields=CONFUSION_FIELDS,
    update=lambda view, p: _confusion_update(view, p, diagnose=False),
    finalize=_confusion_finalize,
    memory=lambda shapes, p: confusion(shapes, p, returns_matrix=True),
    reference="sklearn.metrics.confusion_matrix",
    example=MULTICLASS_EXAMPLE,
)

FUNCTIONS = (accuracy, top_k_accuracy, precision, recall, f1, confusion_matrix)
