"""Multiclass losses on logits [N, K] or [N, K, d1, ...] (torch layout, classes on dim 1).

Every softmax loss here reads the request's shared per-row statistics
(logsumexp, max, Σz) from the batch memo, so several of them on the same
logits cost one pass over the logits.  Losses that need more than those
statistics (margins, the runner-up score, a tempered softmax) walk the scores
block by block (:func:`per_row_blocks`), never building a second tensor of the
size of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lossd.kernels.chunks import iter_class_last_chunks, iter_row_chunks
from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role, no_valid_element
from lossd.kernels.dtypes import as_dtype, compute_dtype
from lossd.kernels.examples import K, log_softmax, normal, softmax
from lossd.kernels.examples import class_labels as example_labels
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.reduce import Terms, mean_loss
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = [
    "FUNCTIONS",
    "LOGITS",
    "LABELS",
    "TARGET_PROBS",
    "INPUT_KIND",
    "class_labels",
    "class_weight_vector",
    "gather_class",
    "per_row_blocks",
    "check_logits",
    "need_two_classes",
    "label_log_prob",
    "SCORES",
    "CLASS_LABELS",
    "MULTICLASS_EXAMPLE",
    "SCORES_EXAMPLE",
]

LOGITS = Role("logits", "[N, K] or [N, K, d1, ...]", "float", "unnormalized scores (or log-probabilities / probabilities per input_kind)")
LABELS = Role("labels", "[N] or [N, d1, ...]", "index", "class indices in [0, K) or ignore_index", optional=True, one_of="truth")
TARGET_PROBS = Role(
    "target_probs", "same shape as logits", "float", "soft targets: a distribution over classes per row", optional=True, one_of="truth"
)
INPUT_KIND = Param(
    "input_kind",
    "str",
    "logits",
    "how the scores are given; probs (or log_probs) rows must sum to 1 within 1e-3 and are renormalized before use",
    choices=("logits", "log_probs", "probs"),
)
CLASS_WEIGHT = Param("weight", "float_list", None, "per-class weights [K] (torch semantics: weighted mean divides by Σ w_y)", nullable=True)


def check_logits(view: View, role: str = "logits") -> torch.Tensor:
    """The role's class scores [N, K] or [N, K, d1, ...] as sent (floating point)."""
    z = view.scores(role)
    view.expect_ndim(role, z, range(2, 9), "[N, K] or [N, K, d1, ...]")
    return z


def class_labels(view: View, z: torch.Tensor, ignore_index: int | None, role: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels checked against logits [N, K, d...]: (int64 labels with ignored set to 0, valid mask).

    Checked once per request for each labels tensor, K and ignore_index (the
    batch memo): cross-entropy, accuracy and ECE of the same labels share it."""
    y, valid, _ = _checked_labels(view, z, ignore_index, role)
    return y, valid


def labels_all_valid(view: View, z: torch.Tensor, ignore_index: int | None, role: str = "labels") -> bool:
    """Whether the labels :func:`class_labels` checked for ``z`` are all valid (the mask all True).

    Read from the batch memo, without an op or the diagnostics a check adds; False when not checked yet."""
    checked = view.batch.checked_labels.get((view.tensor_name(role), z.shape[1], ignore_index))
    return checked is not None and checked[2] == 0


def _checked_labels(view: View, z: torch.Tensor, ignore_index: int | None, role: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`class_labels`, and how many labels equal ``ignore_index`` (0: the valid mask is all True)."""
    k = z.shape[1]
    key = (view.tensor_name(role), k, ignore_index)
    checked = view.batch.checked_labels.get(key)
    y = view.index_labels(role) if checked is None else checked[0]
    expected = z.shape[:1] + z.shape[2:]
    if tuple(y.shape) != tuple(expected):
        raise view.error(role, f"expected shape {list(expected)} (logits {list(z.shape)} without the class dim 1), got {list(y.shape)}")
    if checked is None:
        valid, all_valid = view.label_mask(role, y, k, ignore_index)
        view.diagnose_class_imbalance(role, y, valid, k)
        if all_valid:  # nothing to count or zero: the labels as they are
            checked = (y, valid, 0)
        else:
            checked = (torch.where(valid, y, torch.zeros_like(y)), valid, int((~valid).sum()))
        view.batch.checked_labels[key] = checked
    y, valid, ignored = checked
    if ignored and valid.numel() and ignored / valid.numel() > 0.5 and ignored < valid.numel():
        view.diag(
            "ignored_fraction", f"{ignored} of {valid.numel()} labels ({ignored / valid.numel():.0%}) equal ignore_index={ignore_index}"
        )
    return y, valid, ignored


def class_weight_vector(view: View, p: Mapping[str, Any], k: int, dtype: torch.dtype, name: str = "weight") -> torch.Tensor | None:
    """The per-class weight parameter ``name`` as a [k] tensor (None when not given); its length must be k."""
    w = p.get(name)
    if w is None:
        return None
    if len(w) != k:
        raise view.param_error(name, f"expected {k} class weights (one per class), got {len(w)}")
    if any(x < 0 for x in w):
        raise view.param_error(name, "expected non-negative class weights")
    vector = torch.tensor(w, dtype=dtype)
    _check_representable(view, name, w, vector)
    return vector.to(view.batch.device)


def _check_representable(view: View, name: str, given: Sequence[float], vector: torch.Tensor) -> None:
    """Refuse a weight the compute dtype turns into inf or 0: the one would make the mean NaN, the other drop a class unsaid."""
    if vector.dtype == torch.float64 or not bool((torch.isinf(vector) | (vector == 0)).any()):
        return  # the usual case: one reduction over K values
    for k, (x, rounded) in enumerate(zip(given, vector.tolist(), strict=True)):
        if math.isinf(rounded) or (rounded == 0 and x != 0):
            became, dtype = "inf" if math.isinf(rounded) else "0", str(vector.dtype).removeprefix("torch.")
            raise view.param_error(
                name,
                f"expected class weights that {dtype} (the scores' compute dtype) can hold,"
                f" got {name}[{k}] = {x:g}, which rounds to {became}; scale the weights (a weighted mean depends only on their ratios)",
                index=k,
            )


def gather_class(z: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """z[n, y[n, ...], ...]: the score of each element's label, [N, d...]."""
    return as_dtype(z.gather(1, y.unsqueeze(1)).squeeze(1), dtype)


def _rowwise_class_sum(z: torch.Tensor, vec: torch.Tensor | None, soft: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Σ_k c_k z_k per element, with c = vec (per class) times soft (per element and class), chunked."""
    out = torch.empty(z.shape[:1] + z.shape[2:], dtype=dtype, device=z.device).reshape(-1)
    row = 0
    chunks_q = iter_class_last_chunks(soft, 1) if soft is not None else None
    for _, _, rows in iter_class_last_chunks(z, 1):
        rows = rows.to(dtype)
        c = next(chunks_q)[2].to(dtype) if chunks_q is not None else None
        if vec is not None:
            c = vec if c is None else c * vec
        # −inf scores with zero coefficient contribute 0, not NaN.
        prod = torch.where(c != 0, rows * c, torch.zeros((), dtype=dtype, device=rows.device)) if c is not None else rows
        out[row : row + rows.shape[0]] = prod.sum(dim=1)
        row += rows.shape[0]
    return out.reshape(z.shape[:1] + z.shape[2:])


def _soft_terms(view: View, z: torch.Tensor, p: Mapping[str, Any]) -> Terms:
    q = view.float("target_probs")
    if tuple(q.shape) != tuple(z.shape):
        raise view.error("target_probs", f"expected the shape of logits {list(z.shape)}, got {list(q.shape)}")
    if bool((q < 0).any()):
        raise view.error("target_probs", "expected non-negative target probabilities")
    several = (q == 1).sum(dim=1) > 1
    if bool(several.any()):
        view.diag(
            "multi_label_targets_with_softmax",
            f"{int(several.sum())} rows of target_probs hold several ones: multi-label targets under softmax cross-entropy; use bce_with_logits",
        )
    dtype = compute_dtype(z.dtype)
    k = z.shape[1]
    eps = p["label_smoothing"]
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    w = class_weight_vector(view, p, k, dtype)
    q = q.to(dtype)
    if eps:
        q = q * (1 - eps) + eps / k if p["smoothing_mode"] == "uniform" else q * (1 - eps) + (1 - q) * eps / max(k - 1, 1)
    # −Σ_k w_k q_k log p_k = L Σ_k w_k q_k − Σ_k w_k q_k z_k
    wq_sum = (q * w.reshape((1, k) + (1,) * (z.ndim - 2))).sum(1) if w is not None else q.sum(1)
    loss = stats.lse * wq_sum - _rowwise_class_sum(z, w, q, dtype)
    return Terms(loss)


def _cross_entropy_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z = check_logits(view)
    if view.has("target_probs"):
        if view.has("labels"):
            raise view.error("target_probs", "send either labels (class indices) or target_probs (soft targets), not both")
        return _soft_terms(view, z, p)
    if not view.has("labels"):
        raise view.error("labels", "cross_entropy needs class indices (role 'labels') or soft targets (role 'target_probs')")
    dtype = compute_dtype(z.dtype)
    k = z.shape[1]
    y, valid, ignored = _checked_labels(view, z, p["ignore_index"], "labels")
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    zs = view.log_scores("logits", p["input_kind"])
    nll = stats.lse - gather_class(zs, y, dtype)
    w = class_weight_vector(view, p, k, dtype)
    eps, mode = p["label_smoothing"], p["smoothing_mode"]
    if not eps and w is None and not ignored:
        return Terms(nll)  # every label valid, no class weight: every element weighs 1
    wy = valid.to(dtype) if w is None else w[y] * valid
    if not eps:
        return Terms(nll, wy)
    if mode == "others" and k < 2:
        raise view.param_error("smoothing_mode", "smoothing_mode='others' spreads ε over the K−1 other classes and needs K >= 2")
    # Σ_k w_k (L − z_k): the smoothing term over all classes.
    wsum = torch.tensor(float(k), dtype=dtype) if w is None else w.sum()
    smooth_all = stats.lse * wsum - (stats.sum if w is None else _rowwise_class_sum(zs, w, None, dtype))
    w_label = torch.ones_like(nll) if w is None else w[y]
    if mode == "uniform":  # torch: q_y = 1 − ε + ε/K, others ε/K
        weighted = (1 - eps) * w_label * nll + eps / k * smooth_all
    else:  # fairseq / seed 002: q_y = 1 − ε, others ε/(K−1)
        weighted = (1 - eps) * w_label * nll + eps / (k - 1) * (smooth_all - w_label * nll)
    return Terms(nll, wy, weighted=weighted * valid)


MULTICLASS_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, K), "labels": example_labels(n)})
_LOG_PROBS_EXAMPLE = Example(lambda rng, n: {"log_probs": log_softmax(normal(rng, n, K)), "labels": example_labels(n)})
_KL_EXAMPLE = Example(lambda rng, n: {"log_probs": log_softmax(normal(rng, n, K)), "target": softmax(normal(rng, n, K))})
_DISTILLATION_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, K), "teacher_logits": normal(rng, n, K)})
SCORES_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, K)})


cross_entropy = mean_loss(
    name="cross_entropy",
    family="classification",
    summary="softmax cross-entropy with class weights, ignore_index, label smoothing (uniform or others) and soft targets",
    roles=(LOGITS, LABELS, TARGET_PROBS),
    params=(
        CLASS_WEIGHT,
        IGNORE_INDEX,
        Param("label_smoothing", "float", 0.0, "ε: mass moved from the label to the other classes", minimum=0.0, maximum=1.0),
        Param(
            "smoothing_mode",
            "str",
            "uniform",
            "uniform: q_y = 1−ε+ε/K (torch); others: q_y = 1−ε, ε/(K−1) elsewhere (fairseq)",
            choices=("uniform", "others"),
        ),
        INPUT_KIND,
    ),
    terms=_cross_entropy_terms,
    reference="torch.nn.functional.cross_entropy; float64 formula for smoothing_mode='others'",
    example=MULTICLASS_EXAMPLE,
)


# -- the rest of the multiclass family -----------------------------------------

SCORES = Role("logits", "[N, K] or [N, K, d1, ...]", "float", "unnormalized scores (logits), classes on dim 1")
CLASS_LABELS = Role("labels", "[N] or [N, d1, ...]", "index", "class indices in [0, K) or ignore_index")


def _element_shape(z: torch.Tensor) -> torch.Size:
    return z.shape[:1] + z.shape[2:]


def per_row_blocks(
    tensors: tuple[torch.Tensor, ...], aux: tuple[torch.Tensor, ...], dtype: torch.dtype, fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """fn(blocks [m, K] of each tensor, aux values [m] of each row) -> [m], block by block.

    ``tensors`` share one shape [N, K, d...] (classes on dim 1); ``aux`` are
    per-element values [N, d...].  Only one block of each tensor is ever
    copied or transformed at a time, so large K costs O(block) extra memory."""
    shape = _element_shape(tensors[0])
    out = torch.empty(shape.numel(), dtype=dtype, device=tensors[0].device)
    flat_aux = [a.reshape(-1) for a in aux]
    for parts in zip(*(iter_row_chunks(t, 1) for t in tensors), strict=True):
        row = parts[0][0]
        m = parts[0][1].shape[0]
        blocks = [b.to(dtype) for _, b in parts]
        out[row : row + m] = fn(*blocks, *(a[row : row + m] for a in flat_aux))
    return out.reshape(shape)


def need_two_classes(view: View, z: torch.Tensor, why: str) -> None:
    """Refuse scores with fewer than two classes on dim 1 (``why`` names what needs them)."""
    if z.shape[1] < 2:
        raise view.error("logits", f"{why} needs at least 2 classes on dim 1, got K={z.shape[1]} (shape {list(z.shape)})")


def label_log_prob(view: View, z: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log p_y = z_y − logsumexp(z), from the request's shared row statistics."""
    return gather_class(z, y, dtype) - view.row_stats("logits", 1).lse


def _nll_terms(view: View, p: Mapping[str, Any]) -> Terms:
    lp = check_logits(view, "log_probs")
    dtype = compute_dtype(lp.dtype)
    y, valid = class_labels(view, lp, p["ignore_index"])
    w = class_weight_vector(view, p, lp.shape[1], dtype)
    wy = valid.to(dtype) if w is None else w[y] * valid
    return Terms(-gather_class(lp, y, dtype), wy)


nll = mean_loss(
    name="nll",
    family="classification",
    summary="negative log-likelihood of log-probabilities, with class weights and ignore_index",
    roles=(Role("log_probs", "[N, K] or [N, K, d1, ...]", "float", "log-probabilities, classes on dim 1"), CLASS_LABELS),
    params=(CLASS_WEIGHT, IGNORE_INDEX),
    terms=_nll_terms,
    reference="torch.nn.functional.nll_loss",
    example=_LOG_PROBS_EXAMPLE,
)


# kl_div keeps torch's four reductions, so it declares its state itself rather than through mean_loss.
KL_REDUCTION = Param(
    "reduction",
    "str",
    "batchmean",
    "batchmean: Σ / N (the true KL per sample); sum; mean: Σ / number of elements (torch's 'mean'); none: pointwise values",
    choices=("batchmean", "sum", "mean", "none"),
)
KL_FIELDS = {"total": MergeOp.SUM, "rows": MergeOp.SUM, "elements": MergeOp.SUM}


def _kl_pointwise(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    """target · (log target − input) elementwise; a zero target contributes 0 even where input is −inf."""
    x = view.scores("log_probs")
    if x.ndim < 1:
        raise view.error("log_probs", f"expected shape [N, ...], got a scalar {list(x.shape)}")
    dtype = compute_dtype(x.dtype)
    t = view.numeric("target", dtype=dtype)
    view.expect_shape("target", t, x.shape, "the shape of log_probs")
    x = x.to(dtype)
    if p["log_target"]:
        q = torch.exp(t)
        return torch.where(q > 0, q * (t - x), torch.zeros((), dtype=dtype, device=x.device))
    if bool((t < 0).any()):
        raise view.error("target", "expected non-negative target probabilities (pass log_target=true for log-probabilities)")
    return torch.where(t > 0, torch.xlogy(t, t) - t * x, torch.zeros((), dtype=dtype, device=x.device))


def _kl_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    pointwise = _kl_pointwise(view, p)
    return {
        "total": pointwise.to(torch.float64).sum().cpu(),
        "rows": torch.tensor(float(pointwise.shape[0]), dtype=torch.float64),
        "elements": torch.tensor(float(pointwise.numel()), dtype=torch.float64),
    }


def _kl_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    total = float(fields["total"])
    if p["reduction"] == "sum":
        return Result({"value": total}, denominator=float(fields["rows"]), denominator_kind="samples", numerator=total)
    denominator, kind = (float(fields["elements"]), "elements") if p["reduction"] == "mean" else (float(fields["rows"]), "samples")
    return Result(
        {"value": total / denominator if denominator else float("nan")}, denominator=denominator, denominator_kind=kind, numerator=total
    )


def _empty_check(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    if params.get("reduction", "batchmean") == "sum":
        return []
    return no_valid_element(float(fields["rows"]), "no rows were sent; the mean is NaN with denominator 0")


kl_div = FunctionDef(
    name="kl_div",
    family="classification",
    summary="KL divergence Σ target·(log target − log_probs) with torch's reductions (batchmean is the true KL per sample)",
    roles=(
        Role("log_probs", "[N, ...]", "float", "log-probabilities of the approximating distribution"),
        Role("target", "same shape as log_probs", "float", "target probabilities (or log-probabilities with log_target=true)"),
    ),
    params=(Param("log_target", "bool", False, "the target is given as log-probabilities"), KL_REDUCTION),
    outputs=(Output("value", "the reduced divergence"),),
    fields=KL_FIELDS,
    update=_kl_update,
    finalize=_kl_finalize,
    per_element=_kl_pointwise,
    reference="torch.nn.functional.kl_div (a zero target contributes 0 where torch gives 0·(−inf) = NaN)",
    finalize_diagnostics=_empty_check,
    example=_KL_EXAMPLE,
)


def _distillation_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    s = check_logits(view, "logits")
    t = view.scores("teacher_logits")
    view.expect_shape("teacher_logits", t, s.shape, "the shape of logits")
    dtype = compute_dtype(s.dtype if s.element_size() >= t.element_size() else t.dtype)
    temp = p["temperature"]
    if temp == 1.0:  # the plain logsumexp is the request's shared row statistic
        aux: tuple[torch.Tensor, ...] = (view.row_stats("logits", 1).lse.to(dtype), view.row_stats("teacher_logits", 1).lse.to(dtype))
    else:
        aux = ()

    def kl_rows(sb: torch.Tensor, tb: torch.Tensor, *lse: torch.Tensor) -> torch.Tensor:
        sb, tb = sb / temp, tb / temp
        lse_s, lse_t = lse if lse else (torch.logsumexp(sb, 1), torch.logsumexp(tb, 1))
        log_pt = tb - lse_t[:, None]
        pt = torch.exp(log_pt)
        term = torch.where(pt > 0, pt * (log_pt - sb + lse_s[:, None]), torch.zeros((), dtype=dtype, device=sb.device))
        return term.sum(1)

    kl = per_row_blocks((s, t), aux, dtype, kl_rows)
    return {
        "total": (kl.to(torch.float64).sum() * temp * temp).cpu(),
        "rows": torch.tensor(float(s.shape[0]), dtype=torch.float64),
    }


def _distillation_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    rows, total = float(fields["rows"]), float(fields["total"])
    return Result({"value": total / rows if rows else float("nan")}, denominator=rows, denominator_kind="samples", numerator=total)


distillation_kl = FunctionDef(
    name="distillation_kl",
    family="classification",
    summary="knowledge distillation: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes (and d...) and divided by N",
    roles=(
        Role("logits", "[N, K] or [N, K, d1, ...]", "float", "student logits, classes on dim 1"),
        Role("teacher_logits", "same shape as logits", "float", "teacher logits"),
    ),
    params=(
        Param(
            "temperature",
            "float",
            1.0,
            "T: both distributions are softened by T; the loss is scaled by T²",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    ),
    outputs=(Output("value", "T² · KL per sample (batchmean)"),),
    fields={"total": MergeOp.SUM, "rows": MergeOp.SUM},
    update=_distillation_update,
    finalize=_distillation_finalize,
    reference="T² · torch.nn.functional.kl_div(log_softmax(s/T), softmax(t/T), reduction='batchmean')",
    finalize_diagnostics=_empty_check,
    example=_DISTILLATION_EXAMPLE,
)

FUNCTIONS = (cross_entropy, nll, kl_div, distillation_kl)
