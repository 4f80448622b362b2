"""Regression losses on predictions and targets of the same shape (r = target − prediction).

Each loss is a per-element value reduced by :func:`lossd.kernels.reduce.mean_loss`,
so every one of them takes ``reduction``, the optional per-row ``weights``
and merges exactly over chunks, streams and ranks.  Terms that can overflow
(``exp`` in ``poisson_nll``) are computed in float64 so that only a genuine
float64 overflow gives inf, and that is reported, never clipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lossd.kernels.declarations import Example, Role
from lossd.kernels.examples import normal
from lossd.kernels.params import Param
from lossd.kernels.reduce import Terms, mean_loss
from lossd.kernels.view import View, first_index

__all__ = ["FUNCTIONS", "PREDICTIONS", "TARGETS", "regression_pair", "POISSON_EPS"]

PREDICTIONS = Role("predictions", "[N, ...]", "float", "predicted values")
TARGETS = Role("targets", "same shape as predictions", "float", "observed values (integer dtypes are accepted and cast)")
QUANTILE_PREDICTIONS = Role(
    "predictions",
    "targets' shape + [Q] (or targets' shape when Q = 1)",
    "float",
    "one predicted quantile per entry of `quantiles`, on the last dim",
)
VARIANCE = Role(
    "variance",
    "predictions' shape, predictions' shape without its last dim, or predictions' shape with one dim set to 1",
    "float",
    "predicted variances (non-negative); broadcast as torch.nn.functional.gaussian_nll_loss does",
)

# torch.nn.functional.poisson_nll_loss's default eps, added to the rate inside the log when log_input=false.
POISSON_EPS = 1e-8
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG2 = math.log(2.0)


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are never computed in their own precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _targets(view: View) -> torch.Tensor:
    return view.numeric("targets")


def regression_pair(view: View) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) checked to have the same shape, in a common compute dtype."""
    pred = view.scores("predictions")
    view.expect_ndim("predictions", pred, range(1, 9), "[N, ...]")
    target = _targets(view)
    if tuple(target.shape) != tuple(pred.shape):
        raise view.error("targets", f"expected the shape of predictions {list(pred.shape)}, got {list(target.shape)}")
    dtype = _common_dtype(pred, target)
    return pred.to(dtype), target.to(dtype)


def _residual(view: View) -> torch.Tensor:
    pred, target = regression_pair(view)
    return target - pred


def _mse_terms(view: View, p: Mapping[str, Any]) -> Terms:
    r = _residual(view)
    return Terms(r * r)


def _mae_terms(view: View, p: Mapping[str, Any]) -> Terms:
    return Terms(_residual(view).abs())


def _huber_terms(view: View, p: Mapping[str, Any]) -> Terms:
    a = _residual(view).abs()
    d = p["delta"]
    return Terms(torch.where(a < d, 0.5 * a * a, d * (a - 0.5 * d)))


def _smooth_l1_terms(view: View, p: Mapping[str, Any]) -> Terms:
    a = _residual(view).abs()
    b = p["beta"]
    if b == 0:  # torch: beta = 0 is exactly the L1 loss (no division by zero)
        return Terms(a)
    return Terms(torch.where(a < b, 0.5 * a * a / b, a - 0.5 * b))


def _log_cosh_terms(view: View, p: Mapping[str, Any]) -> Terms:
    # log cosh r = |r| + log1p(e^(−2|r|)) − log 2: cosh itself overflows float64 past |r| ≈ 710.
    a = _residual(view).abs()
    return Terms(a + torch.log1p(torch.exp(-2 * a)) - _LOG2)


def _quantile_terms(view: View, p: Mapping[str, Any]) -> Terms:
    """Pinball loss averaged over the Q quantiles of each row: one value per target entry."""
    pred = view.scores("predictions")
    target = _targets(view)
    view.expect_ndim("targets", target, range(1, 8), "[N, ...]")
    qs = p["quantiles"]
    if tuple(pred.shape) == tuple(target.shape) and len(qs) == 1:
        pred = pred.unsqueeze(-1)
    elif tuple(pred.shape) != tuple(target.shape) + (len(qs),):
        raise view.error(
            "predictions",
            f"expected shape {list(target.shape) + [len(qs)]} (targets {list(target.shape)} + one column per quantile, "
            f"Q = {len(qs)}), got {list(pred.shape)}",
        )
    dtype = _common_dtype(pred, target)
    q = torch.tensor(qs, dtype=dtype, device=pred.device)
    r = target.to(dtype).unsqueeze(-1) - pred.to(dtype)
    return Terms(torch.maximum(q * r, (q - 1) * r).mean(dim=-1))


def _variance_like(view: View, var: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The variance broadcast to the predictions' shape, with torch's accepted layouts only."""
    if tuple(var.shape) == tuple(shape):
        return var
    if tuple(var.shape) == tuple(shape[:-1]):  # one variance per row of the last dim (homoscedastic)
        return var.unsqueeze(-1).expand(shape)
    if var.ndim == len(shape):
        mismatched = [i for i, (a, b) in enumerate(zip(shape, var.shape)) if a != b]
        if len(mismatched) == 1 and var.shape[mismatched[0]] == 1:
            return var.expand(shape)
    raise view.error(
        "variance",
        f"expected shape {list(shape)}, {list(shape[:-1])} or {list(shape)} with one dim set to 1 (predictions {list(shape)}), got {list(var.shape)}",
    )


def _gaussian_nll_terms(view: View, p: Mapping[str, Any]) -> Terms:
    pred, target = regression_pair(view)
    var = view.numeric("variance")
    neg = var < 0
    if bool(neg.any()):
        i = first_index(neg)
        raise view.error("variance", f"expected non-negative variances, got {float(var.reshape(-1)[i])!r} at flat index {i}")
    dtype = _common_dtype(pred, var)
    var = _variance_like(view, var, pred.shape).to(dtype)
    # torch semantics: eps is a floor on the variance (documented by the parameter), not a silent fix.
    var = var.clamp(min=p["eps"])
    r = target.to(dtype) - pred.to(dtype)
    loss = 0.5 * (torch.log(var) + r * r / var)
    if p["full"]:
        loss = loss + _HALF_LOG_2PI
    return Terms(loss)


def _poisson_nll_terms(view: View, p: Mapping[str, Any]) -> Terms:
    pred, target = regression_pair(view)
    neg = target < 0
    if bool(neg.any()):
        i = first_index(neg)
        raise view.error("targets", f"expected non-negative counts, got {float(target.reshape(-1)[i])!r} at flat index {i}")
    # float64 throughout: exp(prediction) must only overflow where float64 does.
    z, y = pred.to(torch.float64), target.to(torch.float64)
    if p["log_input"]:
        rate = torch.exp(z)
        overflow = torch.isinf(rate) & torch.isfinite(z)
        if bool(overflow.any()):
            view.diag(
                "overflow", f"exp(prediction) overflowed float64 for {int(overflow.sum())} elements (log-rate > 709.78); their loss is inf"
            )
        loss = rate - y * z
    else:
        bad = z < 0
        if bool(bad.any()):
            i = first_index(bad)
            raise view.error(
                "predictions", f"log_input=false expects non-negative rates, got {float(z.reshape(-1)[i])!r} at flat index {i}"
            )
        loss = z - y * torch.log(z + POISSON_EPS)
    if p["full"]:
        # Stirling's approximation of log(y!), used by torch for y > 1 only.
        safe = torch.where(y > 1, y, torch.ones_like(y))
        stirling = safe * torch.log(safe) - safe + 0.5 * torch.log(2 * math.pi * safe)
        loss = loss + torch.where(y > 1, stirling, torch.zeros_like(y))
    return Terms(loss)


_EXAMPLE = Example(lambda rng, n: {"predictions": normal(rng, n), "targets": normal(rng, n)})
_COUNT_EXAMPLE = Example(lambda rng, n: {"predictions": normal(rng, n), "targets": rng.poisson(2.0, n).astype(np.float32)})
_VARIANCE_EXAMPLE = Example(
    lambda rng, n: {"predictions": normal(rng, n), "targets": normal(rng, n), "variance": np.abs(normal(rng, n)) + 0.5}
)


mse = mean_loss(
    name="mse",
    family="regression",
    summary="mean squared error r²",
    roles=(PREDICTIONS, TARGETS),
    params=(),
    terms=_mse_terms,
    reference="torch.nn.functional.mse_loss",
    example=_EXAMPLE,
)
mae = mean_loss(
    name="mae",
    family="regression",
    summary="mean absolute error |r|",
    roles=(PREDICTIONS, TARGETS),
    params=(),
    terms=_mae_terms,
    reference="torch.nn.functional.l1_loss",
    example=_EXAMPLE,
    aliases=("l1",),
)
huber = mean_loss(
    name="huber",
    family="regression",
    summary="½r² if |r| ≤ δ else δ(|r| − ½δ)",
    roles=(PREDICTIONS, TARGETS),
    params=(Param("delta", "float", 1.0, "δ: where the loss turns from quadratic to linear", minimum=0.0, exclusive_minimum=True),),
    terms=_huber_terms,
    reference="torch.nn.functional.huber_loss",
    example=_EXAMPLE,
)
smooth_l1 = mean_loss(
    name="smooth_l1",
    family="regression",
    summary="huber / β: ½r²/β if |r| < β else |r| − ½β (β = 0 is L1)",
    roles=(PREDICTIONS, TARGETS),
    params=(Param("beta", "float", 1.0, "β: where the loss turns from quadratic to linear; 0 gives the L1 loss", minimum=0.0),),
    terms=_smooth_l1_terms,
    reference="torch.nn.functional.smooth_l1_loss",
    example=_EXAMPLE,
)
log_cosh = mean_loss(
    name="log_cosh",
    family="regression",
    summary="log cosh r, computed as |r| + log1p(e^(−2|r|)) − log 2 (finite for any finite r)",
    roles=(PREDICTIONS, TARGETS),
    params=(),
    terms=_log_cosh_terms,
    reference="float64 log(cosh(r))",
    example=_EXAMPLE,
)
quantile = mean_loss(
    name="quantile",
    family="regression",
    summary="pinball loss max(q·r, (q−1)·r) averaged over the quantiles of each row",
    roles=(QUANTILE_PREDICTIONS, TARGETS),
    params=(
        Param(
            "quantiles",
            "float_list",
            (0.5,),
            "the quantile levels q in [0, 1], one per column of predictions' last dim",
            minimum=0.0,
            maximum=1.0,
        ),
    ),
    terms=_quantile_terms,
    reference="sklearn.metrics.mean_pinball_loss, one call per quantile, averaged",
    example=_EXAMPLE,
)
gaussian_nll = mean_loss(
    name="gaussian_nll",
    family="regression",
    summary="½(log max(σ², eps) + r²/max(σ², eps)) (+ ½log 2π when full)",
    roles=(PREDICTIONS, TARGETS, VARIANCE),
    params=(
        Param(
            "eps",
            "float",
            1e-6,
            "floor on the variance (torch clamps the variance to eps); at most 1e30, which float32 variances can hold",
            minimum=0.0,
            exclusive_minimum=True,
            maximum=1e30,
        ),
        Param("full", "bool", False, "add the constant ½log 2π"),
    ),
    terms=_gaussian_nll_terms,
    reference="torch.nn.functional.gaussian_nll_loss",
    example=_VARIANCE_EXAMPLE,
)
poisson_nll = mean_loss(
    name="poisson_nll",
    family="regression",
    summary="log_input: e^z − y·z; else λ − y·log(λ + 1e-8) (+ Stirling's log y! for y > 1 when full)",
    roles=(PREDICTIONS, TARGETS),
    params=(
        Param("log_input", "bool", True, "predictions are log-rates z (true) or rates λ >= 0 (false)"),
        Param("full", "bool", False, "add Stirling's approximation y·log y − y + ½log(2πy) for targets > 1"),
    ),
    terms=_poisson_nll_terms,
    reference="torch.nn.functional.poisson_nll_loss (eps=1e-8)",
    example=_COUNT_EXAMPLE,
)

FUNCTIONS = (
    mse,
    mae,
    huber,
    smooth_l1,
    log_cosh,
    quantile,
    gaussian_nll,
    poisson_nll,
)
