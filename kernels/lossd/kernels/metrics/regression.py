"""Regression metrics (rmse, r2, explained_variance) from mergeable moments.

R² and explained variance need Σ(y − ȳ)² over the whole evaluation set,
which is not a sum of per-batch values.  The state therefore keeps, per
output column, the weighted moments (Σw, mean, M2) of the targets and of the
residuals r = y − ŷ, merged with Chan et al.'s parallel formula
(:data:`MergeOp.MOMENTS`), plus Σw·r².  Means are never averaged.

Constant targets (or residuals) must give an M2 of exactly 0 for sklearn's
conventions (R² = 1 if perfect else 0), but rounding in a mean makes M2 a
tiny positive number instead; per-column MIN/MAX fields detect constancy
exactly, in any merge order.

``mae`` is the regression loss of the same name (lossd.kernels.losses.regression).
Multi-output targets [N, D] are averaged over outputs like sklearn's
default ``multioutput='uniform_average'``; per-output values come back in the
``per_output`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role, no_valid_element
from lossd.kernels.examples import normal
from lossd.kernels.losses.regression import regression_pair
from lossd.kernels.reduce import WEIGHTS_ROLE
from lossd.kernels.state import MergeOp, moments_of
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "FIELDS", "regression_state"]

PREDICTIONS = Role("predictions", "[N] or [N, D]", "float", "predicted values")
TARGETS = Role("targets", "same shape as predictions", "float", "observed values; [N, D] for D outputs")

FIELDS = {
    "targets": MergeOp.MOMENTS,  # [D, 3] (Σw, weighted mean, Σw(y − ȳ)²)
    "residuals": MergeOp.MOMENTS,  # [D, 3] the same for r = y − ŷ
    "sse": MergeOp.SUM,  # [D] Σ w·r²
    "target_min": MergeOp.MIN,  # [D] over rows of non-zero weight: constancy, exactly
    "target_max": MergeOp.MAX,
    "residual_min": MergeOp.MIN,
    "residual_max": MergeOp.MAX,
    "rows": MergeOp.SUM,  # number of rows (sklearn's R² needs at least 2)
}


def _weighted_moments(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(Σw, mean, M2) per column of x [N, D] in float64; plain moments when unweighted."""
    if w is None:
        return moments_of(x, dim=0)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    keep = w != 0  # a zero-weight row adds nothing, even if it holds inf or NaN
    total = w.sum(dim=0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    mean = torch.where(total > 0, torch.where(keep, w * x, zero).sum(dim=0) / safe, torch.zeros_like(total))
    m2 = torch.where(keep, w * (x - mean) ** 2, zero).sum(dim=0)
    return torch.stack([total, mean, m2], dim=-1)


def _extremes(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column min and max over rows of non-zero weight (+inf / −inf when there are none)."""
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    keep = torch.ones_like(x, dtype=torch.bool) if w is None else w > 0
    if x.shape[0] == 0:  # amin/amax refuse empty dims
        return inf.expand(x.shape[1:]).clone(), (-inf).expand(x.shape[1:]).clone()
    return torch.where(keep, x, inf).amin(dim=0), torch.where(keep, x, -inf).amax(dim=0)


def regression_state(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The shared state of every regression metric, for one batch."""
    pred, target = regression_pair(view)
    view.expect_ndim("predictions", pred, (1, 2), "[N] or [N, D]")
    if pred.ndim == 2 and pred.shape[1] == 0:
        raise view.error("predictions", f"expected at least one output column, got shape {list(pred.shape)}")
    y = target.to(torch.float64).reshape(target.shape[0], -1)
    r = y - pred.to(torch.float64).reshape(y.shape)
    sw = view.sample_weights(y.shape, torch.float64)
    y_lo, y_hi = _extremes(y, sw)
    r_lo, r_hi = _extremes(r, sw)
    sq = r * r if sw is None else torch.where(sw != 0, sw * r * r, torch.zeros_like(r))
    return {
        "targets": _weighted_moments(y, sw),
        "residuals": _weighted_moments(r, sw),
        "sse": sq.sum(dim=0),
        "target_min": y_lo,
        "target_max": y_hi,
        "residual_min": r_lo,
        "residual_max": r_hi,
        "rows": torch.tensor(float(y.shape[0]), dtype=torch.float64),
    }


def _sklearn_ratio_score(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """1 − num/den per output with sklearn's force_finite conventions: den = 0 gives 1 if num = 0, else 0."""
    out = np.ones_like(numerator)
    valid = (numerator != 0) & (denominator != 0)
    out[valid] = 1 - numerator[valid] / denominator[valid]
    out[(numerator != 0) & (denominator == 0)] = 0.0
    return out


def _spread(fields: Mapping[str, torch.Tensor], name: str) -> np.ndarray:
    """Σw(x − x̄)² per output, exactly 0 when the column is constant."""
    m2 = fields[name][..., 2].numpy().copy()
    prefix = "target" if name == "targets" else "residual"
    m2[(fields[f"{prefix}_min"] == fields[f"{prefix}_max"]).numpy()] = 0.0
    return m2


def _rmse(fields: Mapping[str, torch.Tensor]) -> np.ndarray:
    weight = fields["targets"][..., 0].numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse: np.ndarray = np.sqrt(fields["sse"].numpy() / weight)
    return rmse


def _r2(fields: Mapping[str, torch.Tensor]) -> np.ndarray:
    if float(fields["rows"]) < 2:  # sklearn: R² is not defined for fewer than two samples
        return np.full(fields["sse"].shape, np.nan)
    return _sklearn_ratio_score(fields["sse"].numpy(), _spread(fields, "targets"))


def _explained_variance(fields: Mapping[str, torch.Tensor]) -> np.ndarray:
    return _sklearn_ratio_score(_spread(fields, "residuals"), _spread(fields, "targets"))


def _finalizer(
    per_output: Callable[[Mapping[str, torch.Tensor]], np.ndarray],
) -> Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Result]:
    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        weight = _total_weight(fields)
        values = per_output(fields) if weight > 0 else np.full(fields["sse"].shape, np.nan)
        kind = "samples" if weight == float(fields["rows"]) else "weights"
        return Result({"value": float(values.mean())}, {"per_output": values}, denominator=weight, denominator_kind=kind)

    return finalize


def _total_weight(fields: Mapping[str, torch.Tensor]) -> float:
    """Σw over rows (the same for every output column)."""
    return float(fields["targets"][0, 0])


def _no_weight_check(fields: Mapping[str, Any], p: Mapping[str, Any]) -> list[tuple[str, str]]:
    return no_valid_element(_total_weight(fields), "no row had non-zero weight; the metric is NaN with denominator 0")


_EXAMPLE = Example(lambda rng, n: {"predictions": normal(rng, n), "targets": normal(rng, n)})


def _moment_metric(name: str, summary: str, per_output: Callable[[Mapping[str, torch.Tensor]], np.ndarray], reference: str) -> FunctionDef:
    """A metric finalized from the shared moments state: the variants differ only in ``per_output``."""
    return FunctionDef(
        name=name,
        family="metric",
        summary=summary,
        roles=(PREDICTIONS, TARGETS, WEIGHTS_ROLE),
        params=(),
        outputs=(
            Output("value", "the metric, averaged uniformly over outputs (sklearn multioutput='uniform_average')"),
            Output("per_output", "the metric of each output column [D]", tensor=True),
        ),
        fields=FIELDS,
        update=regression_state,
        finalize=_finalizer(per_output),
        reference=reference,
        example=_EXAMPLE,
        finalize_diagnostics=_no_weight_check,
    )


rmse = _moment_metric("rmse", "root mean squared error √(Σw·r² / Σw) per output", _rmse, "sklearn.metrics.root_mean_squared_error")
r2 = _moment_metric("r2", "coefficient of determination 1 − Σw·r² / Σw(y − ȳ)² per output", _r2, "sklearn.metrics.r2_score")
explained_variance = _moment_metric(
    "explained_variance",
    "1 − Var_w(r) / Var_w(y) per output",
    _explained_variance,
    "sklearn.metrics.explained_variance_score",
)

FUNCTIONS = (rmse, r2, explained_variance)
