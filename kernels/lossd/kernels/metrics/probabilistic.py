"""Probabilistic metrics: log loss, Brier score, predictive entropy and perplexity.

Each is a weighted mean of per-element values (perplexity: the exponential of
the token-mean NLL), computed in float64 from the shared row statistics, so
that split batches merge to the unsplit value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.chunks import iter_class_last_chunks
from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role
from lossd.kernels.examples import K, T, V, normal
from lossd.kernels.losses.classification import INPUT_KIND, check_logits
from lossd.kernels.metrics.scores import (
    LABELS,
    LOGITS,
    MULTICLASS_EXAMPLE,
    binary_inputs,
    binary_log_probs,
    is_binary,
    multiclass,
)
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.reduce import MEAN_FIELDS, Terms, all_ignored_check, finalize_mean, mean_loss, weighted_sums
from lossd.kernels.view import View

__all__ = ["FUNCTIONS"]

_SCORES_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, K)})
_LM_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, T, V), "labels": rng.integers(0, V, (n, T))})


def _terms(values: torch.Tensor, valid: torch.Tensor) -> Terms:
    """Per-element metric values over valid elements, in float64 (the optional sample weights are applied by mean_loss)."""
    return Terms(values.to(torch.float64), valid)


# -- proper scores and entropy ---------------------------------------------------------------------
def _log_loss_terms(view: View, p: Mapping[str, Any]) -> Terms:
    if is_binary(view):
        _, y = binary_inputs(view, hard=False)
        log_p, log_q = binary_log_probs(view, p["input_kind"])
        y = y.to(log_p.dtype)
        # y·log p is 0 where y is 0, even when log p is −inf.
        loss = -(torch.where(y != 0, y * log_p, 0.0) + torch.where(y != 1, (1 - y) * log_q, 0.0))
        return _terms(loss, torch.ones_like(y, dtype=torch.bool))
    z, y, valid = multiclass(view, p)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    scores = view.log_scores("logits", p["input_kind"])
    nll = stats.lse - scores.gather(1, y.unsqueeze(1)).squeeze(1).to(stats.lse.dtype)
    return _terms(nll, valid)


def _brier_terms(view: View, p: Mapping[str, Any]) -> Terms:
    if is_binary(view):
        _, y = binary_inputs(view, hard=False)
        log_p, _ = binary_log_probs(view, p["input_kind"])
        return _terms((torch.exp(log_p) - y.to(log_p.dtype)) ** 2, torch.ones_like(y, dtype=torch.bool))
    z, y, valid = multiclass(view, p)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    scores = view.log_scores("logits", p["input_kind"])
    return _terms(_multiclass_brier(scores, y, stats.lse), valid)


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


def _entropy_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z = view.scores("logits")
    if z.ndim == 1:
        log_p, log_q = binary_log_probs(view, p["input_kind"])
        prob, q = torch.exp(log_p), torch.exp(log_q)
        h = -(torch.where(prob > 0, prob * log_p, 0.0) + torch.where(q > 0, q * log_q, 0.0))
    else:
        check_logits(view)
        stats = view.row_stats("logits", 1, input_kind=p["input_kind"], with_entropy=True)
        h = stats.entropy if stats.entropy is not None else torch.full_like(stats.lse, math.nan)
    return _terms(h, torch.ones_like(h, dtype=torch.bool))


# log_loss and brier read binary truth [N] with logits [N], or class labels with [N, K] scores.
BINARY_TRUTH = Role("targets", "[N]", "float", "binary truth in [0, 1], with logits [N]", optional=True, one_of="truth")

log_loss = mean_loss(
    name="log_loss",
    family="metric",
    summary="mean negative log-likelihood of the true class (binary: of the target, soft targets allowed)",
    roles=(LOGITS, LABELS, BINARY_TRUTH),
    params=(IGNORE_INDEX, INPUT_KIND),
    terms=_log_loss_terms,
    reference="sklearn.metrics.log_loss (which clips probabilities to [eps, 1 − eps]; lossd does not)",
    example=MULTICLASS_EXAMPLE,
    reduction=False,
    doc="Σ w·(−log p_y) / Σ w, natural log",
)

brier = mean_loss(
    name="brier",
    family="metric",
    summary="Brier score: binary mean (p − y)²; multiclass mean Σ_k (p_k − onehot_k)²",
    roles=(LOGITS, LABELS, BINARY_TRUTH),
    params=(IGNORE_INDEX, INPUT_KIND),
    terms=_brier_terms,
    reference="sklearn.metrics.brier_score_loss (binary; multiclass with scale_by_half=False)",
    example=MULTICLASS_EXAMPLE,
    reduction=False,
    doc="Σ w·brier / Σ w",
)

entropy = mean_loss(
    name="entropy",
    family="metric",
    summary="mean predictive entropy in nats (binary logits [N]: of σ(z))",
    roles=(Role("logits", "[N] (binary) or [N, K] / [N, K, d1, ...]", "float", "scores"),),
    params=(INPUT_KIND,),
    terms=_entropy_terms,
    reference="float64 formula −Σ_k p_k log p_k",
    example=_SCORES_EXAMPLE,
    reduction=False,
    doc="Σ w·H(p) / Σ w",
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


perplexity = FunctionDef(
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
    example=_LM_EXAMPLE,
)

FUNCTIONS = (log_loss, brier, entropy, perplexity)
