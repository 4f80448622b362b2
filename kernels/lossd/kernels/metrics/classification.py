"""Classification metrics: accuracy, the confusion-matrix family, AUROC / AP, proper scores, perplexity.

Two input layouts, chosen by the truth role that is sent (never guessed from values):

- binary: ``logits`` [N] with ``targets`` [N] in {0, 1};
- multiclass: ``logits`` [N, K] or [N, K, d1, ...] (torch layout) with ``labels``
  [N, d1, ...] (class indices or ``ignore_index``).

Predictions and confidences come from the request's shared per-row statistics
(argmax, logsumexp, entropy), so accuracy, F1, log loss and cross-entropy of the
same logits cost one pass over them.  Every state is a sum (or, for exact
AUROC, a concatenation of scores) and merges exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lossd.kernels.losses.classification import INPUT_KIND, check_logits, class_labels
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.plan import View, iter_class_last_chunks
from lossd.kernels.reduce import MEAN_FIELDS, WEIGHTS_ROLE, all_ignored_check, finalize_mean, weighted_sums
from lossd.kernels.registry import FunctionDef, Output, Result, Role, register
from lossd.kernels.state import MergeOp

__all__ = [
    "accuracy",
    "top_k_accuracy",
    "precision",
    "recall",
    "f1",
    "confusion_matrix",
    "auroc",
    "average_precision",
    "log_loss",
    "brier",
    "entropy",
    "perplexity",
    "exact_rank_scores",
    "binned_rank_scores",
]

LOGITS = Role(
    "logits",
    "[N] (binary, with targets) or [N, K] / [N, K, d1, ...] (multiclass, with labels)",
    "float",
    "scores: logits unless input_kind says otherwise",
)
LABELS = Role("labels", "[N] or [N, d1, ...]", "index", "multiclass truth: class indices in [0, K) or ignore_index", optional=True)
TARGETS = Role("targets", "[N]", "binary", "binary truth in {0, 1}, with logits [N]", optional=True)
THRESHOLD = Param(
    "threshold",
    "float",
    0.0,
    "binary inputs: predict 1 where the logit > threshold (probs / log_probs: where p > σ(threshold))",
)
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
BINS = Param(
    "bins",
    "int",
    None,
    "None: exact (the state keeps every score, bounded by the server's exact-state limit); "
    "T: a T-bin histogram of probabilities per class (mergeable, approximate)",
    nullable=True,
    minimum=2,
    maximum=1_000_000,
)

# The K×K confusion state of precision / recall / f1 / confusion_matrix: 4096² float64 is 128 MiB.
MAX_CONFUSION_CLASSES = 4096

CONFUSION_FIELDS = {"matrix": MergeOp.SUM, "count": MergeOp.SUM}  # K×K Σ weights; elements of non-zero weight


# -- inputs ----------------------------------------------------------------------------------------
def _is_binary(view: View) -> bool:
    """Binary when ``targets`` is sent, multiclass when ``labels`` is; both or neither is an error."""
    has_targets, has_labels = view.has("targets"), view.has("labels")
    if has_targets and has_labels:
        raise view.error(
            "targets", "send either targets ({0, 1}, with logits [N]) or labels (class indices, with logits [N, K, ...]), not both"
        )
    if not (has_targets or has_labels):
        raise view.error("labels", "needs labels (class indices, with logits [N, K, ...]) or targets ({0, 1}, with logits [N])")
    return has_targets


def _binary_inputs(view: View, *, hard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N] as sent, targets [N] as floats), targets in {0, 1} unless ``hard`` is False."""
    z = view.scores("logits")
    if z.ndim != 1:
        raise view.error(
            "logits", f"binary inputs (targets sent) take logits of shape [N], got {list(z.shape)}; multiclass logits need labels"
        )
    y = view.binary_targets("targets")
    view.expect_shape("targets", y, z.shape, "one target per logit")
    if hard:
        soft = (y != 0) & (y != 1)
        if bool(soft.any()):
            first = int(torch.nonzero(soft)[0][0])
            raise view.error("targets", f"expected targets in {{0, 1}}, got {float(y[first])!r} at index {first}")
    return z, y


def _binary_log_probs(view: View, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 − p)) of binary scores [N] in float64, without cancellation.

    Float64 costs nothing on N scalars and makes each element's value
    independent of the vectorized kernel's tail handling, so split batches
    merge to the unsplit value within 1e-9."""
    if kind == "logits":
        z = view.float("logits", dtype=torch.float64)
        return -F.softplus(-z), -F.softplus(z)
    raw = view.scores("logits").to(torch.float64)
    if kind == "probs":
        view.log_space("logits", kind)  # refuses values outside [0, 1]
        return torch.log(raw), torch.log1p(-raw)
    if bool((raw > 0).any()):
        raise view.error("logits", "input_kind='log_probs' expects log-probabilities <= 0, got a positive value")
    return raw, _log1mexp(raw)


def _log1mexp(lp: torch.Tensor) -> torch.Tensor:
    """log(1 − e^lp) for lp <= 0 (Mächler 2012: two branches, each accurate on its side of −log 2)."""
    near = lp > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(lp)), torch.log1p(-torch.exp(lp)))


def _binary_predictions(view: View, z: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Predicted class (bool) of binary scores: logit > threshold, or p > σ(threshold)."""
    threshold, kind = p["threshold"], p["input_kind"]
    if kind == "logits":
        return z.to(torch.float64) > threshold  # never round the threshold to a float16 logit
    log_threshold = -(max(-threshold, 0.0) + math.log1p(math.exp(-abs(threshold))))  # log σ(threshold) = −softplus(−threshold)
    lp, _ = _binary_log_probs(view, kind)
    return lp > log_threshold


def _multiclass(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, K, d...] as sent, labels [N, d...] with ignored set to 0, valid mask)."""
    z = view.scores("logits")
    if z.ndim == 1:
        raise view.error(
            "logits",
            "logits [N] are binary scores: send their truth as role 'targets' ({0, 1}); labels go with multiclass logits [N, K, ...]",
        )
    z = check_logits(view)
    y, valid = class_labels(view, z, p["ignore_index"])
    return z, y, valid


def _truth_and_predictions(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(labels, predictions, valid mask, K) for either layout; binary counts as K = 2."""
    if _is_binary(view):
        z, y = _binary_inputs(view)
        return y.to(torch.int64), _binary_predictions(view, z, p).to(torch.int64), torch.ones_like(y, dtype=torch.bool), 2
    z, y, valid = _multiclass(view, p)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    return y, stats.argmax, valid, z.shape[1]


def _diagnose_imbalance(view: View, y: torch.Tensor, valid: torch.Tensor, k: int) -> None:
    """class_imbalance of the labels (multiclass) or targets (binary) these metrics read."""
    view.diagnose_class_imbalance("targets" if _is_binary(view) else "labels", y, valid, k)


def _mean_state(view: View, values: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ w·v, Σ w, count over valid elements (w: optional sample weights), in float64."""
    w = valid.to(torch.float64)
    sw = view.sample_weights(values.shape, torch.float64)
    if sw is not None:
        w = w * sw
    contributions = torch.where(w != 0, w * values.to(torch.float64), torch.zeros((), dtype=torch.float64, device=w.device))
    return weighted_sums(contributions, w)


def _finalize_mean(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    kind = "weights" if float(fields["weight"]) != float(fields["count"]) else "samples"
    return finalize_mean(fields, "mean", kind)


def _mean_metric(
    name: str, summary: str, roles: tuple[Role, ...], params: tuple[Param, ...], update: Any, reference: str, doc: str
) -> FunctionDef:
    """A metric whose value is Σ w·v / Σ w over valid elements (state: MEAN_FIELDS)."""
    return register(
        FunctionDef(
            name=name,
            family="metric",
            summary=summary,
            roles=roles + (WEIGHTS_ROLE,),
            params=params,
            outputs=(Output("value", doc),),
            fields=MEAN_FIELDS,
            update=update,
            finalize=_finalize_mean,
            reference=reference,
            finalize_diagnostics=all_ignored_check,
        )
    )


# -- accuracy --------------------------------------------------------------------------------------
def _accuracy_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    y, pred, valid, k = _truth_and_predictions(view, p)
    _diagnose_imbalance(view, y, valid, k)
    correct = (pred == y).to(torch.float64)
    # A row with NaN or inf scores has no meaningful prediction: it makes the value NaN
    # (as it does for the losses) instead of being scored by where argmax lands.
    if _is_binary(view):
        finite = torch.isfinite(view.scores("logits"))
    else:
        finite = torch.isfinite(view.row_stats("logits", 1, input_kind=p["input_kind"]).lse)
    return _mean_state(view, torch.where(finite, correct, torch.full_like(correct, math.nan)), valid)


def _top_k_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Correct when fewer than k classes outrank the label; ties go to the lower class index, as argmax."""
    z, y, valid = _multiclass(view, p)
    k = z.shape[1]
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
    return _mean_state(view, ranks.reshape(y.shape) < p["k"], valid)


accuracy = _mean_metric(
    "accuracy",
    "share of correct top-1 predictions (binary: logit > threshold)",
    (LOGITS, LABELS, TARGETS),
    (IGNORE_INDEX, THRESHOLD, INPUT_KIND),
    _accuracy_update,
    "sklearn.metrics.accuracy_score",
    "Σ w·[prediction = label] / Σ w",
)

top_k_accuracy = _mean_metric(
    "top_k_accuracy",
    "share of labels among the k highest-scoring classes (ties: lower class index first)",
    (
        Role("logits", "[N, K] or [N, K, d1, ...]", "float", "class scores"),
        Role("labels", "[N] or [N, d1, ...]", "index", "class indices or ignore_index"),
    ),
    (Param("k", "int", 5, "how many top classes count as a hit (k >= K: every valid element is a hit)", minimum=1), IGNORE_INDEX),
    _top_k_update,
    "sklearn.metrics.top_k_accuracy_score",
    "Σ w·[rank of label < k] / Σ w",
)


# -- confusion-matrix family -----------------------------------------------------------------------
def _confusion_update(view: View, p: Mapping[str, Any], *, diagnose: bool) -> dict[str, torch.Tensor]:
    y, pred, valid, k = _truth_and_predictions(view, p)
    if k > MAX_CONFUSION_CLASSES:
        raise view.error("logits", f"the confusion-matrix state is K×K; K={k} is over the limit of {MAX_CONFUSION_CLASSES} classes")
    if diagnose:
        _diagnose_imbalance(view, y, valid, k)
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


def _nan_average(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """sklearn's _nanaverage: NaN entries dropped; all-zero weights fall back to a plain mean."""
    keep = ~torch.isnan(values)
    if values.numel() == 0 or not bool(keep.any()):
        return math.nan
    values = values[keep]
    if weights is not None:
        weights = weights[keep]
        if float(weights.sum()) != 0:
            return float((values * weights).sum() / weights.sum())
    return float(values.mean())


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
            value = _nan_average(per_class, true[present] if p["average"] == "weighted" else None)
        return Result({"value": value}, denominator=total, denominator_kind=kind)

    return finalize


def _register_prf(which: str, formula: str) -> FunctionDef:
    return register(
        FunctionDef(
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
            reference="sklearn.metrics.precision_recall_fscore_support",
        )
    )


precision = _register_prf("precision", "tp / (tp + fp)")
recall = _register_prf("recall", "tp / (tp + fn)")
f1 = _register_prf("f1", "2tp / (2tp + fp + fn)")


def _confusion_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    total, kind = _confusion_denominator(fields)
    return Result(tensors={"value": fields["matrix"].numpy()}, denominator=total, denominator_kind=kind)


confusion_matrix = register(
    FunctionDef(
        name="confusion_matrix",
        family="metric",
        summary="K×K counts (rows: true class, columns: predicted class); binary inputs give 2×2",
        roles=(LOGITS, LABELS, TARGETS, WEIGHTS_ROLE),
        params=(IGNORE_INDEX, THRESHOLD, INPUT_KIND),
        outputs=(Output("value", "[K, K] counts (Σ weights when weighted), float64", tensor=True),),
        fields=CONFUSION_FIELDS,
        update=lambda view, p: _confusion_update(view, p, diagnose=False),
        finalize=_confusion_finalize,
        reference="sklearn.metrics.confusion_matrix",
    )
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
        _binary_log_probs(view, kind)  # refuses positive values


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
    binary = _is_binary(view)
    if binary:
        z, y = _binary_inputs(view)
        _validate_kind(view, kind, binary)
        scores, labels = z.to(torch.float64), y.to(torch.int64)
        if bins is None:
            return _rank_state(scores, labels, scores[:0], scores[:0], torch.isnan(scores).sum().to(torch.float64))
        pos, neg, nan_rows = _bin_counts(_probabilities(scores, kind, binary=True)[:, None], (labels == 1)[:, None], bins)
        return _rank_state(scores[:0], labels[:0], pos[0], neg[0], nan_rows)
    z, y, valid = _multiclass(view, p)
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
        values = {"value": _nan_average(per_class, None), "exact": 1.0 if p["bins"] is None else 0.0}
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


def _register_rank(name: str, summary: str, reference: str) -> FunctionDef:
    return register(
        FunctionDef(
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
        )
    )


auroc = _register_rank(
    "auroc",
    "area under the ROC curve: binary, or one-vs-rest macro over softmax probabilities; exact or binned (bins=T)",
    "sklearn.metrics.roc_auc_score (multi_class='ovr', average='macro')",
)
average_precision = _register_rank(
    "average_precision",
    "average precision (area under the step precision-recall curve): binary or one-vs-rest macro; exact or binned",
    "sklearn.metrics.average_precision_score",
)


# -- proper scores and entropy ---------------------------------------------------------------------
def _log_loss_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if _is_binary(view):
        _, y = _binary_inputs(view, hard=False)
        log_p, log_q = _binary_log_probs(view, p["input_kind"])
        y = y.to(log_p.dtype)
        # y·log p is 0 where y is 0, even when log p is −inf.
        loss = -(torch.where(y != 0, y * log_p, 0.0) + torch.where(y != 1, (1 - y) * log_q, 0.0))
        return _mean_state(view, loss, torch.ones_like(y, dtype=torch.bool))
    z, y, valid = _multiclass(view, p)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    scores = view.log_scores("logits", p["input_kind"])
    nll = stats.lse - scores.gather(1, y.unsqueeze(1)).squeeze(1).to(stats.lse.dtype)
    return _mean_state(view, nll, valid)


def _brier_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if _is_binary(view):
        _, y = _binary_inputs(view, hard=False)
        log_p, _ = _binary_log_probs(view, p["input_kind"])
        return _mean_state(view, (torch.exp(log_p) - y.to(log_p.dtype)) ** 2, torch.ones_like(y, dtype=torch.bool))
    z, y, valid = _multiclass(view, p)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    scores = view.log_scores("logits", p["input_kind"])
    return _mean_state(view, _multiclass_brier(scores, y, stats.lse), valid)


def _multiclass_brier(scores: torch.Tensor, y: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Σ_k (p_k − [k = y])² = (Σ_{k≠y} p_k)² + Σ_{k≠y} p_k², one chunked pass in float64.

    Written over the other classes so that a confident correct row (p_y → 1)
    keeps its small value instead of cancelling 1 − 2p_y + Σp² to zero."""
    out = torch.empty(y.numel(), dtype=torch.float64, device=scores.device)
    flat_y, flat_lse = y.reshape(-1), lse.reshape(-1)
    row = 0
    for _, _, rows in iter_class_last_chunks(scores, 1):
        m = rows.shape[0]
        prob = torch.exp(rows.to(torch.float64) - flat_lse[row : row + m, None].to(torch.float64))
        prob = prob.scatter(1, flat_y[row : row + m, None], 0.0)
        out[row : row + m] = prob.sum(1) ** 2 + (prob * prob).sum(1)
        row += m
    return out.reshape(y.shape)


def _entropy_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    z = view.scores("logits")
    if z.ndim == 1:
        log_p, log_q = _binary_log_probs(view, p["input_kind"])
        prob, q = torch.exp(log_p), torch.exp(log_q)
        h = -(torch.where(prob > 0, prob * log_p, 0.0) + torch.where(q > 0, q * log_q, 0.0))
    else:
        check_logits(view)
        stats = view.row_stats("logits", 1, input_kind=p["input_kind"], with_entropy=True)
        h = stats.entropy if stats.entropy is not None else torch.full_like(stats.lse, math.nan)
    return _mean_state(view, h, torch.ones_like(h, dtype=torch.bool))


log_loss = _mean_metric(
    "log_loss",
    "mean negative log-likelihood of the true class (binary: of the target, soft targets allowed)",
    (LOGITS, LABELS, Role("targets", "[N]", "float", "binary truth in [0, 1], with logits [N]", optional=True)),
    (IGNORE_INDEX, INPUT_KIND),
    _log_loss_update,
    "sklearn.metrics.log_loss (which clips probabilities to [eps, 1 − eps]; lossd does not)",
    "Σ w·(−log p_y) / Σ w, natural log",
)

brier = _mean_metric(
    "brier",
    "Brier score: binary mean (p − y)²; multiclass mean Σ_k (p_k − onehot_k)²",
    (LOGITS, LABELS, Role("targets", "[N]", "float", "binary truth in [0, 1], with logits [N]", optional=True)),
    (IGNORE_INDEX, INPUT_KIND),
    _brier_update,
    "sklearn.metrics.brier_score_loss (binary; multiclass with scale_by_half=False)",
    "Σ w·brier / Σ w",
)

entropy = _mean_metric(
    "entropy",
    "mean predictive entropy in nats (binary logits [N]: of σ(z))",
    (Role("logits", "[N] (binary) or [N, K] / [N, K, d1, ...]", "float", "scores"),),
    (INPUT_KIND,),
    _entropy_update,
    "float64 formula −Σ_k p_k log p_k",
    "Σ w·H(p) / Σ w",
)


# -- perplexity ------------------------------------------------------------------------------------
def _perplexity_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Token-mean NLL from the shared row statistics of the contiguous [B·T, V] rows (no copy of the logits)."""
    z = view.scores("logits")
    view.expect_ndim("logits", z, (3,), "[B, T, V]")
    y = view.index_labels("labels")
    view.expect_shape("labels", y, z.shape[:2], "logits [B, T, V] without the vocabulary dim")
    lse = view.row_stats("logits", 2).lse
    if p["shift"]:  # position t predicts label t + 1
        z, lse, y = z[:, :-1], lse[:, :-1], y[:, 1:]
    valid = view.check_labels("labels", y, z.shape[2], p["ignore_index"])
    safe = torch.where(valid, y, torch.zeros_like(y))
    nll = lse - z.gather(2, safe.unsqueeze(2)).squeeze(2).to(lse.dtype)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    tokens = valid.to(torch.float64)
    return weighted_sums(nll, tokens)


def _exp(x: float) -> float:
    """e^x that overflows to inf (an NLL beyond ~709 nats), never an exception."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _perplexity_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    mean = finalize_mean(fields, "mean", "valid_tokens")
    nll = mean.values["value"]
    return Result({"value": _exp(nll), "nll": nll}, denominator=mean.denominator, denominator_kind="valid_tokens")


perplexity = register(
    FunctionDef(
        name="perplexity",
        family="metric",
        summary="exp of the token-mean NLL of a language model (as lm_cross_entropy's token normalization)",
        roles=(
            Role("logits", "[B, T, V]", "float", "next-token logits"),
            Role("labels", "[B, T]", "index", "token ids in [0, V) or ignore_index"),
        ),
        params=(
            IGNORE_INDEX,
            Param("shift", "bool", True, "logits[:, :-1] predict labels[:, 1:] (causal LM); false: position t predicts label t"),
        ),
        outputs=(Output("value", "exp(Σ nll / Σ valid tokens)"), Output("nll", "the token-mean NLL in nats")),
        fields=MEAN_FIELDS,
        update=_perplexity_update,
        finalize=_perplexity_finalize,
        reference="exp(torch.nn.functional.cross_entropy(..., ignore_index)) on the shifted, flattened tokens",
        finalize_diagnostics=all_ignored_check,
    )
)
