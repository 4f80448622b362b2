"""Temperature scaling: the temperature T that minimizes the NLL of softmax(z / T), as a mergeable state.

The state keeps the summed NLL on a fixed log-spaced grid of temperatures (and
at T = 1), so it merges exactly; the fitted value refines the best grid point
with a parabola through its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.calibration.bins import COMMON, EXAMPLE, F64, ROLES, BinaryScores, MulticlassScores, read_scores
from lossd.kernels.chunks import iter_row_chunks
from lossd.kernels.declarations import FunctionDef, Output, Result, no_valid_element
from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.params import Param
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "temperature_grid"]

# Elements of one [rows, temperatures, classes] block of the temperature pass (about ten temporaries).
TEMPERATURE_BLOCK = 1 << 22


# -- temperature ----------------------------------------------------------------


def temperature_grid(p: Mapping[str, Any]) -> torch.Tensor:
    """The fixed log-spaced grid of temperatures, float64 [G]."""
    return torch.exp(torch.linspace(math.log(p["t_min"]), math.log(p["t_max"]), p["grid_points"], dtype=F64))


def _softplus(v: torch.Tensor) -> torch.Tensor:
    """log(1 + e^v), exact at ±inf."""
    return v.clamp(min=0) + torch.log1p(torch.exp(-v.abs()))


def _binary_nll(s: BinaryScores, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ NLL of σ(z/T) per grid point, and Σ NLL at T = 1."""
    sign = 2 * s.targets - 1
    curve = torch.zeros(inverse.numel(), dtype=F64, device=inverse.device)
    step = max(1, TEMPERATURE_BLOCK // inverse.numel())
    for start in range(0, s.logit.numel(), step):
        v = -(sign[start : start + step, None] * s.logit[start : start + step, None]) * inverse[None, :]
        curve += _softplus(v).sum(0)
    return curve, _softplus(-sign * s.logit).sum()


def _multiclass_nll(view: View, s: MulticlassScores, inverse: torch.Tensor, input_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i [lse(z_i/T) − z_{i,y}/T] per grid point, from max-shifted rows, and Σ NLL at T = 1."""
    dtype = compute_dtype(s.scores.dtype)
    g, k = inverse.numel(), s.num_classes
    curve = torch.zeros(g, dtype=F64, device=inverse.device)
    g_step = max(1, min(g, TEMPERATURE_BLOCK // k))
    for first, rows in iter_row_chunks(s.scores, 1):
        part = slice(first, first + rows.shape[0])
        valid = s.valid[part]
        rows = rows[valid].to(dtype)
        labels = s.labels[part][valid]
        shifted = rows - rows.max(dim=1, keepdim=True).values  # <= 0: exp never overflows
        label_gap = -shifted.gather(1, labels[:, None])  # max − z_y >= 0
        r_step = max(1, TEMPERATURE_BLOCK // (g_step * k))
        for r in range(0, rows.shape[0], r_step):
            block = shifted[r : r + r_step]
            for j in range(0, g, g_step):
                inv = inverse[j : j + g_step].to(dtype)
                # The row max is 0 after the shift, so Σ exp >= 1: no overflow, no log(0).
                lse = (block[:, None, :] * inv[None, :, None]).exp_().sum(dim=2).log_()
                curve[j : j + g_step] += (label_gap[r : r + r_step] * inv[None, :] + lse).to(F64).sum(0)
    stats = view.row_stats("logits", 1, input_kind=input_kind)
    labels = s.labels.reshape(stats.lse.shape)
    z_y = s.scores.gather(1, labels.unsqueeze(1)).squeeze(1).reshape(-1)[s.valid]
    at_one = (stats.lse.reshape(-1)[s.valid] - z_y.to(stats.lse.dtype)).to(F64).sum()
    return curve, at_one


def _temperature_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not p["t_min"] < p["t_max"]:
        raise view.param_error("t_max", f"expected t_max > t_min={p['t_min']!r}, got {p['t_max']!r}")
    s = read_scores(view, p)
    inverse = (1 / temperature_grid(p)).to(view.batch.device)
    if isinstance(s, BinaryScores):
        curve, at_one = _binary_nll(s, inverse)
        count = s.logit.numel()
    else:
        curve, at_one = _multiclass_nll(view, s, inverse, p["input_kind"])
        count = int(s.valid.sum())
    return {"nll": curve, "nll_at_1": at_one.reshape(()), "count": torch.tensor(float(count), dtype=F64)}


def _parabola_vertex(u: torch.Tensor, f: torch.Tensor, g: int) -> tuple[float, float]:
    """Vertex (u*, f*) of the parabola through grid points g−1, g, g+1 (uniform spacing in u)."""
    h = float(u[1] - u[0])
    fm, f0, fp = float(f[g - 1]), float(f[g]), float(f[g + 1])
    curvature = fp - 2 * f0 + fm
    if not curvature > 0:
        return float(u[g]), f0
    shift = 0.5 * (fm - fp) / curvature  # in grid steps, within [-1/2, 1/2] at a grid minimum
    return float(u[g]) + shift * h, f0 - (fp - fm) ** 2 / (8 * curvature)


def _finalize_temperature(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    count = float(fields["count"])
    grid = temperature_grid(p)
    curve = fields["nll"] / count if count else torch.full_like(grid, math.nan)
    tensors = {"temperatures": grid.numpy(), "nll_curve": curve.numpy()}
    if not bool(torch.isfinite(curve).all()):
        # No samples, NaN scores, or a label of probability 0 (NLL inf at every T): no optimum.
        nan = math.nan
        at_one = float(fields["nll_at_1"]) / count if count else nan
        return Result({"value": nan, "nll": nan, "nll_at_1": at_one, "at_grid_edge": nan}, tensors, count, "samples")
    g = int(torch.argmin(curve))  # the first minimum
    edge = g in (0, grid.numel() - 1)
    if edge:
        t, nll = float(grid[g]), float(curve[g])
    else:
        u_star, nll = _parabola_vertex(torch.log(grid), curve, g)
        t = math.exp(u_star)
    values = {"value": t, "nll": nll, "nll_at_1": float(fields["nll_at_1"]) / count, "at_grid_edge": float(edge)}
    return Result(values, tensors, count, "samples")


def _temperature_diagnostics(fields: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    return no_valid_element(float(fields["count"]), "no sample was seen (all labels ignored or an empty batch); the temperature is NaN")


temperature = FunctionDef(
    name="temperature",
    family="calibration",
    summary="the NLL-optimal temperature T of softmax(logits / T) (σ(z / T) for binary), from summed NLL on a fixed log-spaced grid",
    roles=ROLES,
    params=(
        Param("t_min", "float", 0.05, "smallest temperature of the grid", minimum=0.0, exclusive_minimum=True),
        Param("t_max", "float", 20.0, "largest temperature of the grid (> t_min)", minimum=0.0, exclusive_minimum=True),
        Param("grid_points", "int", 256, "grid size G: temperatures t_min·(t_max/t_min)^(g/(G−1)), g = 0..G−1", minimum=3, maximum=4096),
    )
    + COMMON,
    outputs=(
        Output("value", "the temperature: the grid minimum of the mean NLL, refined by a parabola in log T through its neighbours"),
        Output(
            "nll",
            "mean NLL at that temperature, interpolated by the parabola through the grid minimum and its neighbours (an estimate; nll_curve holds the exact grid values)",
        ),
        Output("nll_at_1", "mean NLL at T = 1 (the uncalibrated scores)"),
        Output("at_grid_edge", "1.0 when the minimum lies at t_min or t_max: widen the grid"),
        Output("temperatures", "[G] the grid", tensor=True),
        Output("nll_curve", "[G] mean NLL at each grid temperature", tensor=True),
    ),
    fields={"nll": MergeOp.SUM, "nll_at_1": MergeOp.SUM, "count": MergeOp.SUM},
    update=_temperature_update,
    finalize=_finalize_temperature,
    reference="scipy.optimize.minimize_scalar on the float64 NLL of logits / T",
    finalize_diagnostics=_temperature_diagnostics,
    example=EXAMPLE,
)

FUNCTIONS = (temperature,)
