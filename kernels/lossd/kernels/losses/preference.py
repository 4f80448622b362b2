"""Preference and reinforcement-learning losses: Bradley-Terry, DPO, PPO.

These read small tensors (one value per pair, token or task), and the DPO and
PPO terms are differences of summed log-probabilities that cancel badly in
float32, so the family computes in float64 whatever the input dtype.

DPO and PPO report several means (reward accuracy and margin, clip fraction,
approximate KL) next to the loss; their states keep one weighted sum per
output besides Σ w·ℓ, Σ w and the count, so every output merges exactly over
streams.  The auxiliary losses of training (MoE load balancing, task
weighting) live in :mod:`lossd.kernels.losses.auxiliary`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role
from lossd.kernels.examples import normal
from lossd.kernels.params import REDUCTION, Param
from lossd.kernels.reduce import MEAN_FIELDS, WEIGHTS_ROLE, Terms, all_ignored_check, finalize_mean, mean_loss, weighted_sums
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "KL_ESTIMATORS", "kl_estimate", "f64", "same_shape", "binary_mask"]

F64 = torch.float64
KL_ESTIMATORS = ("k1", "k2", "k3")


def f64(view: View, role: str) -> torch.Tensor:
    """A float role (as sent: any float dtype) in float64."""
    return view.scores(role).to(F64)


def same_shape(view: View, role: str, t: torch.Tensor, like: torch.Tensor, like_role: str) -> None:
    """Refuse a role whose shape differs from ``like_role``'s."""
    if tuple(t.shape) != tuple(like.shape):
        raise view.error(role, f"expected the shape of {view.tensor_name(like_role)} {list(like.shape)}, got {list(t.shape)}")


def binary_mask(view: View, role: str, shape: torch.Size) -> torch.Tensor:
    """A 0/1 mask of ``shape`` (bool, integer or float) as float64."""
    m = view.tensor(role)
    if tuple(m.shape) != tuple(shape):
        raise view.error(role, f"expected shape {list(shape)}, got {list(m.shape)}")
    m = m.to(F64)
    bad = (m != 0) & (m != 1)
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0][0])
        raise view.error(role, f"expected a 0/1 mask, got {float(m.reshape(-1)[first])!r} at flat index {first}")
    return m


def kl_estimate(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's per-sample estimators of KL(p ‖ q) from lr = log q(x) − log p(x), x ~ p.

    k1 = −lr (unbiased, high variance), k2 = lr²/2, k3 = e^lr − 1 − lr (unbiased, non-negative)."""
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    return torch.expm1(log_ratio) - log_ratio


def _logps(rng: np.random.Generator, n: int) -> np.ndarray:
    logps: np.ndarray = -np.abs(normal(rng, n)) - 1
    return logps


_PAIRS_EXAMPLE = Example(lambda rng, n: {"chosen_scores": normal(rng, n), "rejected_scores": normal(rng, n)})
_DPO_EXAMPLE = Example(
    lambda rng, n: {
        role: _logps(rng, n)
        for role in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    }
)
_PPO_EXAMPLE = Example(
    lambda rng, n: {"logp_new": -np.abs(normal(rng, n)), "logp_old": -np.abs(normal(rng, n)), "advantages": normal(rng, n)}
)


# -- a mean loss with extra mean outputs -------------------------------------------------
@dataclass
class _Parts:
    """Per-element loss, weight (0 removes an element) and extra per-element values.

    Extras are averaged with the same weights, except those given their own
    weights in ``extra_weights`` (ppo_clip's kl covers only tokens sent with
    a reference policy)."""

    loss: torch.Tensor
    weight: torch.Tensor
    extras: dict[str, torch.Tensor]
    extra_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _masked(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w·x, exactly 0 where w is 0 (padding may hold inf or NaN)."""
    return torch.where(weight != 0, weight * x, torch.zeros_like(x))


def _mean_with_extras(
    *,
    name: str,
    summary: str,
    roles: tuple[Role, ...],
    params: tuple[Param, ...],
    outputs: tuple[Output, ...],
    parts: Callable[[View, Mapping[str, Any]], _Parts],
    reference: str,
    example: Example,
    denominator_kind: str,
    own_weight: tuple[str, ...] = (),
    splittable_if: Callable[[Mapping[str, Any]], bool] | None = None,
) -> FunctionDef:
    """A mean loss (with ``reduction``) whose extra outputs are weighted means too: a :class:`FunctionDef` of dpo, ppo_clip.

    Extras named in ``own_weight`` keep their own Σ weight and are left out
    of the result when it is 0."""
    extras = [o.name for o in outputs[1:]]
    fields = {**MEAN_FIELDS, **{f"sum_{e}": MergeOp.SUM for e in extras}, **{f"weight_{e}": MergeOp.SUM for e in own_weight}}

    def update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        r = parts(view, p)
        state = weighted_sums(_masked(r.loss, r.weight), r.weight)
        for e in extras:
            w = r.extra_weights[e] if e in own_weight else r.weight
            state[f"sum_{e}"] = _masked(r.extras[e], w).sum().cpu()
            if e in own_weight:
                state[f"weight_{e}"] = w.sum().cpu()
        return state

    def finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
        weighted = denominator_kind == "samples" and float(fields["weight"]) != float(fields["count"])
        result = finalize_mean(fields, p["reduction"], "weights" if weighted else denominator_kind)
        for e in extras:
            weight = float(fields[f"weight_{e}" if e in own_weight else "weight"])
            if weight:
                result.values[e] = float(fields[f"sum_{e}"]) / weight
            elif e not in own_weight:
                result.values[e] = float("nan")
        return result

    def per_element(view: View, p: Mapping[str, Any]) -> torch.Tensor:
        r = parts(view, p)
        return _masked(r.loss, r.weight)

    return FunctionDef(
        name=name,
        family="preference",
        summary=summary,
        roles=roles,
        params=params + (REDUCTION,),
        outputs=outputs,
        fields=fields,
        update=update,
        finalize=finalize,
        reference=reference,
        example=example,
        per_element=per_element,
        finalize_diagnostics=all_ignored_check,
        splittable_if=splittable_if,
    )


# -- pairwise_logistic --------------------------------------------------------------------
def _pairwise_logistic(view: View, p: Mapping[str, Any]) -> Terms:
    chosen = f64(view, "chosen_scores")
    rejected = f64(view, "rejected_scores")
    same_shape(view, "rejected_scores", rejected, chosen, "chosen_scores")
    return Terms(F.softplus(-(chosen - rejected - p["margin"])))  # −log σ(s⁺ − s⁻ − m), stable for any sign


pairwise_logistic = mean_loss(
    name="pairwise_logistic",
    family="preference",
    summary="Bradley-Terry pairwise logistic loss −log σ(s⁺ − s⁻ − margin) (reward models, reranking)",
    roles=(
        Role("chosen_scores", "[N] (any shape)", "float", "score of the preferred item of each pair"),
        Role("rejected_scores", "same shape as chosen_scores", "float", "score of the dispreferred item"),
    ),
    params=(Param("margin", "float", 0.0, "score gap m the preferred item must exceed"),),
    terms=_pairwise_logistic,
    reference="float64 formula −log σ(s⁺ − s⁻ − m)",
    aliases=("bradley_terry",),
    example=_PAIRS_EXAMPLE,
)


# -- dpo ----------------------------------------------------------------------------------------
_DPO_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")


def _sequence_scores(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """The four sequence log-probabilities [N]: as sent, or reduced from per-token [N, T] with the masks."""
    raw = {role: f64(view, role) for role in _DPO_LOGPS}
    first = raw["policy_chosen_logps"]
    view.expect_ndim("policy_chosen_logps", first, (1, 2), "[N] (sequence log-probs) or [N, T] (per-token, with chosen_mask/rejected_mask)")
    for role in _DPO_LOGPS[1:]:
        if raw[role].ndim != first.ndim or raw[role].shape[0] != first.shape[0]:
            expected = f"[{first.shape[0]}]" if first.ndim == 1 else f"[{first.shape[0]}, T]"
            raise view.error(role, f"expected shape {expected} like policy_chosen_logps, got {list(raw[role].shape)}")
    same_shape(view, "reference_chosen_logps", raw["reference_chosen_logps"], first, "policy_chosen_logps")
    same_shape(view, "reference_rejected_logps", raw["reference_rejected_logps"], raw["policy_rejected_logps"], "policy_rejected_logps")
    if first.ndim == 1:
        for role in ("chosen_mask", "rejected_mask"):
            if view.has(role):
                raise view.error(role, "masks apply to per-token [N, T] log-probs; the log-probs sent are per-sequence [N]")
        if p["score"] != "sum":
            raise view.param_error(
                "score", f"score={p['score']!r} reduces per-token [N, T] log-probs; the log-probs sent are per-sequence [N]"
            )
        return tuple(raw[role] for role in _DPO_LOGPS)
    scores = {}
    for side in ("chosen", "rejected"):
        role = f"{side}_mask"
        if not view.has(role):
            raise view.error(role, f"per-token [N, T] log-probs need {role} (1 for the tokens of the {side} response)")
        mask = binary_mask(view, role, raw[f"policy_{side}_logps"].shape)
        lengths = mask.sum(dim=1)
        if p["score"] == "mean" and bool((lengths == 0).any()):
            empty = int(torch.nonzero(lengths == 0)[0][0])
            raise view.error(role, f"score='mean' needs at least one token per row; row {empty} has none")
        for kind in ("policy", "reference"):
            summed = _masked(raw[f"{kind}_{side}_logps"], mask).sum(dim=1)
            scores[f"{kind}_{side}_logps"] = summed / lengths if p["score"] == "mean" else summed
    return tuple(scores[role] for role in _DPO_LOGPS)


def _dpo_parts(view: View, p: Mapping[str, Any]) -> _Parts:
    pc, pr, rc, rr = _sequence_scores(view, p)
    beta, eps, kind = p["beta"], p["label_smoothing"], p["loss_type"]
    if eps and kind != "sigmoid":
        raise view.param_error("label_smoothing", f"label_smoothing (conservative DPO) applies to loss_type='sigmoid', not {kind!r}")
    logits = (pc - pr) - (rc - rr)
    if kind == "sigmoid":  # TRL: −(1 − ε) log σ(βh) − ε log σ(−βh)
        loss = (1 - eps) * F.softplus(-beta * logits) + eps * F.softplus(beta * logits)
    elif kind == "ipo":  # Azar et al. eq. 17: (h − 1/(2β))²
        loss = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge (RSO): max(0, 1 − βh)
        loss = torch.relu(1 - beta * logits)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    sw = view.sample_weights(loss.shape, F64) if view.has("weights") else None
    weight = torch.ones_like(loss) if sw is None else sw
    extras = {
        "reward_accuracy": (chosen > rejected).to(F64),
        "reward_margin": chosen - rejected,
        "chosen_reward": chosen,
        "rejected_reward": rejected,
    }
    return _Parts(loss, weight, extras)


dpo = _mean_with_extras(
    name="dpo",
    summary="direct preference optimization (sigmoid, IPO or hinge) with implicit-reward accuracy and margin",
    roles=(
        *(Role(r, "[N] or [N, T]", "float", f"{r.replace('_', ' ')}: per sequence, or per token with the side's mask") for r in _DPO_LOGPS),
        Role("chosen_mask", "[N, T]", "binary", "1 for the tokens of the chosen response (per-token inputs only)", optional=True),
        Role("rejected_mask", "[N, T']", "binary", "1 for the tokens of the rejected response (per-token inputs only)", optional=True),
        WEIGHTS_ROLE,
    ),
    params=(
        Param("beta", "float", 0.1, "β: strength of the implicit KL constraint to the reference", minimum=0.0, exclusive_minimum=True),
        Param("loss_type", "str", "sigmoid", "sigmoid (DPO), ipo (Azar et al.) or hinge (RSO)", choices=("sigmoid", "ipo", "hinge")),
        Param(
            "label_smoothing",
            "float",
            0.0,
            "ε of conservative DPO: the share of preference labels assumed flipped (sigmoid only)",
            minimum=0.0,
            maximum=1.0,
        ),
        Param(
            "score",
            "str",
            "sum",
            "how per-token log-probs make a sequence score: sum (DPO) or mean over the masked tokens (TRL uses mean for IPO)",
            choices=("sum", "mean"),
        ),
    ),
    outputs=(
        Output("value", "the reduced DPO loss"),
        Output("reward_accuracy", "share of pairs whose implicit reward β(log π − log π_ref) is higher for the chosen response"),
        Output("reward_margin", "mean chosen minus rejected implicit reward"),
        Output("chosen_reward", "mean implicit reward of the chosen responses"),
        Output("rejected_reward", "mean implicit reward of the rejected responses"),
    ),
    parts=_dpo_parts,
    reference="float64 port of TRL's DPOTrainer.dpo_loss (sigmoid with label smoothing, ipo, hinge) and its reward metrics",
    denominator_kind="samples",
    example=_DPO_EXAMPLE,
)


# -- ppo_clip -------------------------------------------------------------------------------------
def _ppo_parts(view: View, p: Mapping[str, Any]) -> _Parts:
    new = f64(view, "logp_new")
    view.expect_ndim("logp_new", new, (1, 2), "[N] or [N, T]")
    old, adv = f64(view, "logp_old"), f64(view, "advantages")
    same_shape(view, "logp_old", old, new, "logp_new")
    same_shape(view, "advantages", adv, new, "logp_new")
    mask = binary_mask(view, "mask", new.shape) if view.has("mask") else torch.ones_like(new)
    ref = view.optional("logp_ref")
    if ref is None and p["kl_coef"] > 0:
        raise view.error("logp_ref", f"kl_coef={p['kl_coef']:g} penalizes KL to a reference policy; send its log-probs as logp_ref")
    if p["normalize_advantages"]:
        adv = _normalized(view, adv, mask)
    log_ratio = new - old
    ratio = torch.exp(log_ratio)
    eps = p["clip_epsilon"]
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)
    policy = torch.maximum(unclipped, clipped)
    extras = {
        "policy_loss": policy,
        "clip_fraction": (clipped > unclipped).to(F64),  # tokens where the clipped objective is the one used (TRL)
        "approx_kl": kl_estimate(log_ratio, p["kl_estimator"]),  # KL(π_old ‖ π_new) from tokens sampled by π_old
    }
    loss = policy
    if ref is not None:
        ref64 = ref.to(F64)
        same_shape(view, "logp_ref", ref64, new, "logp_new")
        kl = kl_estimate(ref64 - new, p["kl_estimator"])  # KL(π_new ‖ π_ref), as in TRL's GRPO
        extras["kl"] = kl
        loss = policy + p["kl_coef"] * kl
    else:
        extras["kl"] = torch.zeros_like(new)
    return _Parts(loss, mask, extras, {"kl": mask if ref is not None else torch.zeros_like(mask)})


def _normalized(view: View, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A − mean) / (std + 1e-8) over the valid tokens, std with Bessel's correction (CleanRL)."""
    n = float(mask.sum())
    if n < 2:
        raise view.param_error("normalize_advantages", f"normalizing advantages needs at least 2 valid tokens, got {n:g}")
    mean = _masked(adv, mask).sum() / n
    centred = adv - mean
    std = torch.sqrt(_masked(centred * centred, mask).sum() / (n - 1))
    return centred / (std + 1e-8)


ppo_clip = _mean_with_extras(
    name="ppo_clip",
    summary="PPO clipped surrogate −min(r·A, clip(r, 1±ε)·A) + β·KL(π ‖ π_ref), mean over valid tokens, with clip fraction and approximate KL",
    roles=(
        Role("logp_new", "[N] or [N, T]", "float", "log-probs of the taken actions under the current policy"),
        Role("logp_old", "same shape as logp_new", "float", "log-probs under the policy that sampled them"),
        Role("advantages", "same shape as logp_new", "float", "advantage estimates A"),
        Role("mask", "same shape as logp_new", "binary", "1 for valid tokens (default: all)", optional=True),
        Role(
            "logp_ref",
            "same shape as logp_new",
            "float",
            "log-probs under a reference policy, for the KL penalty and the kl output",
            optional=True,
        ),
    ),
    params=(
        Param(
            "clip_epsilon",
            "float",
            0.2,
            "ε: the ratio is clipped to [1 − ε, 1 + ε]",
            minimum=0.0,
            exclusive_minimum=True,
            maximum=1.0,
            exclusive_maximum=True,
        ),
        Param("kl_coef", "float", 0.0, "β: weight of the per-token KL(π ‖ π_ref) penalty (needs logp_ref)", minimum=0.0),
        Param(
            "kl_estimator",
            "str",
            "k3",
            "per-token KL estimator (Schulman): k1 = −lr, k2 = lr²/2, k3 = e^lr − 1 − lr",
            choices=KL_ESTIMATORS,
        ),
        Param(
            "normalize_advantages",
            "bool",
            False,
            "standardize advantages over the batch's valid tokens first (CleanRL); uses batch statistics, so such a batch is never split",
        ),
    ),
    outputs=(
        Output("value", "the reduced loss (policy loss plus kl_coef·KL)"),
        Output("policy_loss", "mean clipped surrogate loss"),
        Output("clip_fraction", "share of valid tokens where the clipped term is the active one"),
        Output("approx_kl", "mean estimate of KL(π_old ‖ π_new) with kl_estimator"),
        Output("kl", "mean estimate of KL(π_new ‖ π_ref) over tokens sent with logp_ref (absent without it)"),
    ),
    parts=_ppo_parts,
    reference="float64 formula (TRL/CleanRL PPO clipped objective, Schulman's k1/k2/k3 KL estimators)",
    denominator_kind="valid_tokens",
    own_weight=("kl",),
    splittable_if=lambda p: not p["normalize_advantages"],
    example=_PPO_EXAMPLE,
)

FUNCTIONS = (pairwise_logistic, dpo, ppo_clip)
