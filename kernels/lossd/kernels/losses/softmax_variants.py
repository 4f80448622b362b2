"""Margin, focal, adaptive-smoothing and z-losses: variants of softmax cross-entropy on class scores.

They read logits [N, K] or [N, K, d1, ...] (classes on dim 1) like
:mod:`lossd.kernels.losses.classification`, share its row statistics, and
walk the scores block by block where they need more than those (margins,
the runner-up score).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.losses.classification import (
    CLASS_LABELS,
    MULTICLASS_EXAMPLE,
    SCORES,
    SCORES_EXAMPLE,
    check_logits,
    class_labels,
    class_weight_vector,
    gather_class,
    label_log_prob,
    need_two_classes,
    per_row_blocks,
)
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.reduce import Terms, mean_loss
from lossd.kernels.view import View

__all__ = ["FUNCTIONS"]


def _multi_margin_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z = check_logits(view)
    k, dtype = z.shape[1], compute_dtype(z.dtype)
    y, valid = class_labels(view, z, p["ignore_index"])
    margin, power = p["margin"], p["p"]
    classes = torch.arange(k, device=z.device)

    def hinge_rows(rows: torch.Tensor, zy: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        h = (margin - zy[:, None] + rows).clamp_min(0)
        h = h * h if power == 2 else h
        per_row: torch.Tensor = h.masked_fill(classes == yb[:, None], 0).sum(1)
        return per_row

    loss = per_row_blocks((z,), (gather_class(z, y, dtype), y), dtype, hinge_rows) / k
    w = class_weight_vector(view, p, k, dtype)
    # torch weighs each term by w_y but divides the mean by N, not by Σ w_y.
    return Terms(loss if w is None else loss * w[y], valid.to(dtype))


multi_margin = mean_loss(
    name="multi_margin",
    family="classification",
    summary="multiclass margin loss Σ_{j≠y} max(0, margin − z_y + z_j)^p / K (torch multi_margin_loss)",
    roles=(SCORES, CLASS_LABELS),
    params=(
        Param("margin", "float", 1.0, "required gap between the label's score and every other score"),
        Param("p", "int", 1, "exponent of the hinge: 1 or 2", minimum=1, maximum=2),
        Param(
            "weight",
            "float_list",
            None,
            "per-class weights [K] multiplying the terms of rows of that label (torch: the mean still divides by N)",
            nullable=True,
        ),
        IGNORE_INDEX,
    ),
    terms=_multi_margin_terms,
    reference="torch.nn.functional.multi_margin_loss",
    example=MULTICLASS_EXAMPLE,
)


def _crammer_singer_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z = check_logits(view)
    need_two_classes(view, z, "multiclass_hinge")
    dtype = compute_dtype(z.dtype)
    y, valid = class_labels(view, z, p["ignore_index"])

    def best_other(rows: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        values, index = rows.topk(2, dim=1)
        return torch.where(index[:, 0] == yb, values[:, 1], values[:, 0])

    runner_up = per_row_blocks((z,), (y,), dtype, best_other)
    return Terms((p["margin"] + runner_up - gather_class(z, y, dtype)).clamp_min(0), valid.to(dtype))


multiclass_hinge = mean_loss(
    name="multiclass_hinge",
    family="classification",
    summary="Crammer–Singer multiclass hinge max(0, margin + max_{j≠y} z_j − z_y)",
    roles=(SCORES, CLASS_LABELS),
    params=(Param("margin", "float", 1.0, "required gap between the label's score and the best other score"), IGNORE_INDEX),
    terms=_crammer_singer_terms,
    reference="sklearn.metrics.hinge_loss (multiclass, margin 1); float64 formula otherwise",
    example=MULTICLASS_EXAMPLE,
)


def _focal_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z = check_logits(view)
    k, dtype = z.shape[1], compute_dtype(z.dtype)
    y, valid = class_labels(view, z, p["ignore_index"])
    log_py = label_log_prob(view, z, y, dtype)
    # (1 − p_y)^γ as (−expm1(log p_y))^γ: exact for confident rows where 1 − p_y underflows in p_y's precision.
    loss = -(-torch.expm1(log_py)).pow(p["gamma"]) * log_py
    alpha = p["alpha"]
    if isinstance(alpha, tuple):
        if len(alpha) != k:
            raise view.param_error("alpha", f"expected a scalar or {k} per-class values (one per class), got {len(alpha)}")
        loss = torch.tensor(alpha, dtype=dtype, device=z.device)[y] * loss
    elif alpha is not None:
        loss = alpha * loss
    # α is part of the loss, not a weight: the mean divides by the number of valid elements.
    return Terms(loss, valid.to(dtype))


focal = mean_loss(
    name="focal",
    family="classification",
    summary="softmax focal loss −α_y (1 − p_y)^γ log p_y (modulating term not detached)",
    roles=(SCORES, CLASS_LABELS),
    params=(
        Param("gamma", "float", 2.0, "focusing exponent γ; 0 gives cross-entropy", minimum=0.0),
        Param(
            "alpha",
            "float_or_list",
            None,
            "α: a scalar or per-class values [K] scaling each element's loss (not a weight of the mean); null for none",
            minimum=0.0,
            nullable=True,
        ),
        IGNORE_INDEX,
    ),
    terms=_focal_terms,
    reference="float64 formula",
    example=MULTICLASS_EXAMPLE,
)


def _adaptive_smoothing_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z = check_logits(view)
    need_two_classes(view, z, "adaptive_label_smoothing (ε spread over the K−1 other classes)")
    k, dtype = z.shape[1], compute_dtype(z.dtype)
    y, valid = class_labels(view, z, p["ignore_index"])
    stats = view.row_stats("logits", 1)
    log_py = gather_class(z, y, dtype) - stats.lse
    eps = (p["base_smoothing"] * (-torch.expm1(log_py))).clamp_min(p["min_smoothing"])
    nll = -log_py
    others = k * stats.lse - stats.sum - nll  # Σ_{j≠y} −log p_j
    return Terms((1 - eps) * nll + eps / (k - 1) * others, valid.to(dtype))


adaptive_label_smoothing = mean_loss(
    name="adaptive_label_smoothing",
    family="classification",
    summary="cross-entropy with per-row smoothing ε_i = max(min, base·(1 − p_y)) (p_y detached): q_y = 1 − ε_i, ε_i/(K−1) elsewhere",
    roles=(SCORES, CLASS_LABELS),
    params=(
        Param("base_smoothing", "float", 0.1, "ε scale: ε_i = base·(1 − p_y) before the floor", minimum=0.0, maximum=1.0),
        Param("min_smoothing", "float", 0.01, "floor of ε_i", minimum=0.0, maximum=1.0),
        IGNORE_INDEX,
    ),
    terms=_adaptive_smoothing_terms,
    reference="float64 formula (seed 001 AdaptiveLabelSmoothing)",
    example=MULTICLASS_EXAMPLE,
)


def _z_loss_terms(view: View, p: Mapping[str, Any]) -> Terms:
    check_logits(view)
    lse = view.row_stats("logits", 1).lse
    return Terms(lse * lse)


z_loss = mean_loss(
    name="z_loss",
    family="classification",
    summary="PaLM auxiliary z-loss: mean of logsumexp(z)² per element",
    roles=(SCORES,),
    params=(),
    terms=_z_loss_terms,
    reference="float64 formula",
    example=SCORES_EXAMPLE,
)

FUNCTIONS = (multi_margin, multiclass_hinge, focal, adaptive_label_smoothing, z_loss)
