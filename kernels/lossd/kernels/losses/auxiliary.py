"""Auxiliary training losses: MoE router load balancing and uncertainty weighting of task losses.

Neither scores predictions against truth: they are the extra terms a training
loop adds to its main loss, and lossd evaluates them so that a run can log
them with the rest.  They report the ``preference`` family in ListFunctions,
as they always have (the family is part of the wire contract).

The MoE load-balancing loss is a product of two whole-data means; its state
keeps their numerators (per-slot expert counts, summed router probabilities)
and the token count, so merged batches give the whole-data value exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lossd.kernels.budget import moe_routing
from lossd.kernels.chunks import CHUNK_ELEMENTS
from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role, no_valid_element
from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.examples import normal
from lossd.kernels.losses.preference import binary_mask, f64, same_shape
from lossd.kernels.params import Param
from lossd.kernels.reduce import batch_loss
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS"]

F64 = torch.float64

_MOE_EXAMPLE = Example(lambda rng, n: {"router_logits": normal(rng, n, 4)})
# One value per task, not per sample: batches do not concatenate.
_TASKS_EXAMPLE = Example(lambda rng, n: {"task_losses": np.abs(normal(rng, 3)), "log_vars": normal(rng, 3)}, rows=False)


# -- moe_load_balancing --------------------------------------------------------------------------
def _moe_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    z = view.scores("router_logits")
    view.expect_ndim("router_logits", z, range(2, 9), "[tokens, E] (or [..., E])")
    experts, k = z.shape[-1], p["top_k"]
    if experts == 0:
        raise view.error("router_logits", f"expected at least one expert, got shape {list(z.shape)}")
    if k > experts:
        raise view.param_error("top_k", f"expected top_k <= the number of experts {experts}, got {k}")
    mask = binary_mask(view, "mask", z.shape[:-1]).reshape(-1) if view.has("mask") else None
    rows = z.reshape(-1, experts)
    dtype = compute_dtype(z.dtype)
    routed = torch.zeros(k * experts, dtype=F64, device=z.device)
    probs = torch.zeros(experts, dtype=F64, device=z.device)
    slot = torch.arange(k, device=z.device) * experts
    step = max(1, CHUNK_ELEMENTS // experts)
    for start in range(0, rows.shape[0], step):
        w = None if mask is None else mask[start : start + step]
        prob = torch.softmax(rows[start : start + step].to(dtype), dim=-1)
        if w is not None:  # padding tokens may hold anything; they count for nothing
            prob = torch.where(w[:, None] != 0, prob, torch.zeros_like(prob))
        chosen = torch.topk(prob, k, dim=-1).indices  # transformers: top-k of the softmax, slot by slot
        index = (chosen + slot).reshape(-1)
        weights = None if w is None else w[:, None].expand(-1, k).reshape(-1)
        routed += torch.bincount(index, weights=weights, minlength=k * experts).to(F64)
        probs += prob.to(F64).sum(dim=0)
    tokens = torch.tensor(float(rows.shape[0]) if mask is None else float(mask.sum()), dtype=F64)
    return {"routed": routed.reshape(k, experts).cpu(), "router_prob": probs.cpu(), "tokens": tokens}


def _moe_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    n = float(fields["tokens"])
    routed, probs = fields["routed"], fields["router_prob"]
    experts = probs.shape[0]
    if n == 0:
        nan = float("nan")
        return Result(
            {"value": nan}, {"expert_fraction": (routed * nan).numpy(), "router_prob": (probs * nan).numpy()}, 0.0, "valid_tokens"
        )
    fraction, mean_prob = routed / n, probs / n
    value = experts * float((fraction * mean_prob[None, :]).sum())
    return Result({"value": value}, {"expert_fraction": fraction.numpy(), "router_prob": mean_prob.numpy()}, n, "valid_tokens")


def _moe_diagnostics(fields: Mapping[str, Any], p: Mapping[str, Any]) -> list[tuple[str, str]]:
    return no_valid_element(float(fields["tokens"]), "every token was masked out; the load-balancing loss is NaN with denominator 0")


moe_load_balancing = FunctionDef(
    name="moe_load_balancing",
    family="preference",
    summary="Switch/Mixtral auxiliary load-balancing loss E·Σ_slot Σ_e f_slot,e·P_e over router logits",
    roles=(
        Role(
            "router_logits",
            "[tokens, E] (or [..., E])",
            "float",
            "router logits of every token (all layers concatenated, as transformers does)",
        ),
        Role(
            "mask",
            "[tokens] (the leading dims of router_logits)",
            "binary",
            "1 for real tokens, 0 for padding (attention mask)",
            optional=True,
        ),
    ),
    params=(Param("top_k", "int", 2, "experts chosen per token", minimum=1),),
    outputs=(
        Output("value", "the load-balancing loss"),
        Output("expert_fraction", "[top_k, E]: share of tokens whose slot-th choice is each expert", tensor=True),
        Output("router_prob", "[E]: mean router probability of each expert", tensor=True),
    ),
    fields={"routed": MergeOp.SUM, "router_prob": MergeOp.SUM, "tokens": MergeOp.SUM},
    update=_moe_update,
    finalize=_moe_finalize,
    reference="transformers' Mixtral load_balancing_loss_func formula (float64 port)",
    finalize_diagnostics=_moe_diagnostics,
    example=_MOE_EXAMPLE,
    memory=moe_routing,
)


# -- uncertainty_weighting -------------------------------------------------------------------------
def _uncertainty_weighting(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    losses = f64(view, "task_losses")
    view.expect_ndim("task_losses", losses, (1,), "[M]")
    if losses.shape[0] == 0:
        raise view.error("task_losses", "expected at least one task, got shape [0]")
    log_vars = f64(view, "log_vars")
    same_shape(view, "log_vars", log_vars, losses, "task_losses")
    total = (0.5 * torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()
    if not bool(torch.isfinite(total)) and bool(torch.isfinite(losses).all() & torch.isfinite(log_vars).all()):
        view.diag(
            "overflow",
            f"exp(−log_vars) overflowed float64 (min log_var {float(log_vars.min()):.4g}); the loss is reported as {float(total)}",
        )
    return total


uncertainty_weighting = batch_loss(
    name="uncertainty_weighting",
    family="preference",
    summary="homoscedastic uncertainty weighting of task losses Σ (½ e^(−s_i) L_i + ½ s_i) (Kendall et al. 2018)",
    roles=(
        Role("task_losses", "[M]", "float", "one loss per task"),
        Role("log_vars", "[M]", "float", "learned log-variance s_i of each task"),
    ),
    params=(),
    value=_uncertainty_weighting,
    reference="float64 formula Σ (½ e^(−s_i) L_i + ½ s_i)",
    example=_TASKS_EXAMPLE,
)

FUNCTIONS = (moe_load_balancing, uncertainty_weighting)
