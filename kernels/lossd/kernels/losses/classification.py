"""Multiclass losses on logits [N, K] or [N, K, d1, ...] (torch layout, classes on dim 1).

Every softmax loss here reads the request's shared per-row statistics
(logsumexp, max, Σz) from the evaluation plan, so several of them on the same
logits cost one pass over the logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.plan import View, compute_dtype, iter_class_last_chunks
from lossd.kernels.reduce import Terms, mean_loss
from lossd.kernels.registry import Role, register

__all__ = ["LOGITS", "LABELS", "TARGET_PROBS", "INPUT_KIND", "class_labels", "class_weight_vector"]

LOGITS = Role("logits", "[N, K] or [N, K, d1, ...]", "float", "unnormalized scores (or log-probabilities / probabilities per input_kind)")
LABELS = Role("labels", "[N] or [N, d1, ...]", "index", "class indices in [0, K) or ignore_index", optional=True)
TARGET_PROBS = Role("target_probs", "same shape as logits", "float", "soft targets: a distribution over classes per row", optional=True)
INPUT_KIND = Param("input_kind", "str", "logits", "how the scores are given", choices=("logits", "log_probs", "probs"))
CLASS_WEIGHT = Param("weight", "float_list", None, "per-class weights [K] (torch semantics: weighted mean divides by Σ w_y)", nullable=True)


def check_logits(view: View, role: str = "logits") -> torch.Tensor:
    z = view.scores(role)
    view.expect_ndim(role, z, range(2, 9), "[N, K] or [N, K, d1, ...]")
    return z


def class_labels(view: View, z: torch.Tensor, ignore_index: int | None, role: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels checked against logits [N, K, d...]: (int64 labels with ignored set to 0, valid mask)."""
    y = view.index_labels(role)
    expected = z.shape[:1] + z.shape[2:]
    if tuple(y.shape) != tuple(expected):
        raise view.error(role, f"expected shape {list(expected)} (logits {list(z.shape)} without the class dim 1), got {list(y.shape)}")
    valid = view.check_labels(role, y, z.shape[1], ignore_index)
    ignored = int((~valid).sum())
    if ignored and valid.numel() and ignored / valid.numel() > 0.5 and ignored < valid.numel():
        view.diag("ignored_fraction", f"{ignored} of {valid.numel()} labels ({ignored / valid.numel():.0%}) equal ignore_index={ignore_index}")
    return torch.where(valid, y, torch.zeros_like(y)), valid


def class_weight_vector(view: View, p: Mapping[str, Any], k: int, dtype: torch.dtype, name: str = "weight") -> torch.Tensor | None:
    w = p.get(name)
    if w is None:
        return None
    if len(w) != k:
        raise view.param_error(name, f"expected {k} class weights (one per class), got {len(w)}")
    if any(x < 0 for x in w):
        raise view.param_error(name, "expected non-negative class weights")
    return torch.tensor(w, dtype=dtype, device=view.batch.device)


def gather_class(z: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """z[n, y[n, ...], ...]: the score of each element's label, [N, d...]."""
    return z.gather(1, y.unsqueeze(1)).squeeze(1).to(dtype)


def _rowwise_class_sum(z: torch.Tensor, vec: torch.Tensor | None, soft: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Σ_k c_k z_k per element, with c = vec (per class) times soft (per element and class), chunked."""
    out = torch.empty(z.shape[:1] + z.shape[2:], dtype=dtype, device=z.device).reshape(-1)
    row = 0
    chunks_q = iter_class_last_chunks(soft, 1) if soft is not None else None
    for _, _, rows in iter_class_last_chunks(z, 1):
        rows = rows.to(dtype)
        c = next(chunks_q)[2].to(dtype) if chunks_q is not None else None  # type: ignore[call-overload]
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
        view.diag("multi_label_targets_with_softmax", f"{int(several.sum())} rows of target_probs hold several ones: multi-label targets under softmax cross-entropy; use bce_with_logits")
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
    y, valid = class_labels(view, z, p["ignore_index"])
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    zs = view.batch.tensors[view.log_space("logits", p["input_kind"])]
    nll = stats.lse - gather_class(zs, y, dtype)
    w = class_weight_vector(view, p, k, dtype)
    wy = valid.to(dtype) if w is None else w[y] * valid
    eps, mode = p["label_smoothing"], p["smoothing_mode"]
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


cross_entropy = register(
    mean_loss(
        name="cross_entropy",
        family="classification",
        summary="softmax cross-entropy with class weights, ignore_index, label smoothing (uniform or others) and soft targets",
        roles=(LOGITS, LABELS, TARGET_PROBS),
        params=(
            CLASS_WEIGHT,
            IGNORE_INDEX,
            Param("label_smoothing", "float", 0.0, "ε: mass moved from the label to the other classes", minimum=0.0, maximum=1.0),
            Param("smoothing_mode", "str", "uniform", "uniform: q_y = 1−ε+ε/K (torch); others: q_y = 1−ε, ε/(K−1) elsewhere (fairseq)", choices=("uniform", "others")),
            INPUT_KIND,
        ),
        terms=_cross_entropy_terms,
        reference="torch.nn.functional.cross_entropy; float64 formula for smoothing_mode='others'",
    )
)
