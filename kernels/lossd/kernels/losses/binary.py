"""Binary and multi-label losses: one independent sigmoid (or margin) per element.

``logits`` z and ``targets`` y in {0, 1} have the same shape: [N] (binary),
[N, C] (multi-label) or [B, C, *spatial] (segmentation).  BCE and the focal
loss accept soft targets in [0, 1]; the margin losses (t = 2y − 1) need hard
0/1 targets.

The dice family (dice, dice_bce, tversky) reads [B, C, *spatial] and reduces
each (sample, channel) entry over its spatial dims, like monai: its
per-element values are the B×C entry losses, so the mergeable state is
(Σ entry loss, entry count) and streams stay exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.declarations import Example, Role
from lossd.kernels.examples import binary_targets, normal
from lossd.kernels.params import Param
from lossd.kernels.reduce import Terms, mean_loss
from lossd.kernels.view import View, first_index

__all__ = ["FUNCTIONS", "LOGITS", "TARGETS", "SEGMENTATION_LOGITS", "bce_terms", "logits_and_targets"]

LOGITS = Role("logits", "[N], [N, C] or [B, C, *spatial]", "float", "one logit per element")
TARGETS = Role("targets", "same shape as logits", "binary", "targets in {0, 1} (float; soft targets in [0, 1] where the loss allows them)")
SEGMENTATION_LOGITS = Role("logits", "[B, C, *spatial]", "float", "per-voxel logits (or probabilities with input_kind='probs')")
SEGMENTATION_TARGETS = Role("targets", "same shape as logits", "binary", "per-voxel targets in [0, 1]")
INPUT_KIND = Param(
    "input_kind", "str", "logits", "logits (a sigmoid is applied) or probs (used as given, must lie in [0, 1])", choices=("logits", "probs")
)
SMOOTH = Param("smooth", "float", 1e-5, "s, added to numerator and denominator (monai smooth_nr = smooth_dr)", minimum=0.0)
MARGIN = Param("margin", "float", 1.0, "the margin m in max(0, m − t·z)")


def _hard_targets(view: View) -> None:
    """Refuse anything but 0/1 targets, with a hint for ±1 labels."""
    t = view.tensor("targets")
    bad = ~((t == 0) | (t == 1))
    if bool(bad.any()):
        i = first_index(bad)
        value = float(t.reshape(-1)[i])
        hint = "; for labels in {-1, 1} send (label + 1) / 2" if value == -1 else ""
        raise view.error("targets", f"expected hard targets in {{0, 1}} (t = 2y − 1), got {value!r} at flat index {i}{hint}")


def logits_and_targets(view: View, *, hard: bool = False, segmentation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of the same shape in a common compute dtype (fp32, or fp64 if either is fp64)."""
    z = view.scores("logits")
    if segmentation:
        view.expect_ndim("logits", z, range(3, 9), "[B, C, *spatial]")
    else:
        view.expect_ndim("logits", z, range(1, 9), "[N], [N, C] or [B, C, *spatial]")
    if hard:
        _hard_targets(view)
    y = view.binary_targets("targets")
    if tuple(y.shape) != tuple(z.shape):
        raise view.error("targets", f"expected the shape of logits {list(z.shape)}, got {list(y.shape)}")
    dtype = torch.float64 if torch.float64 in (z.dtype, y.dtype) else torch.float32
    return z.to(dtype), y.to(dtype)


def _softplus_neg(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^(−z)) = −log σ(z), stable for any finite z."""
    return torch.log1p(torch.exp(-z.abs())) + torch.clamp(-z, min=0)


def _pos_weight(view: View, p: Mapping[str, Any], z: torch.Tensor) -> torch.Tensor | None:
    """pos_weight as a tensor broadcasting over the channel dim 1 (a scalar weighs every element)."""
    pw = p["pos_weight"]
    if pw is None:
        return None
    if isinstance(pw, float):
        return torch.tensor(pw, dtype=z.dtype, device=z.device)
    channels = z.shape[1] if z.ndim >= 2 else 1
    if len(pw) != channels:
        where = f"logits {list(z.shape)} have {channels} channel(s) on dim 1" if z.ndim >= 2 else "logits [N] take a scalar or one value"
        raise view.param_error("pos_weight", f"expected {channels} values ({where}), got {len(pw)}")
    w = torch.tensor(pw, dtype=z.dtype, device=z.device)
    return w if z.ndim == 1 else w.reshape((1, channels) + (1,) * (z.ndim - 2))


def bce_terms(z: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(1 − y)·z + (1 + (pw − 1)·y)·log(1 + e^(−z)): torch's stable BCE with logits, pos_weight on the y term."""
    log_weight = 1.0 if pos_weight is None else 1 + (pos_weight - 1) * y
    return (1 - y) * z + log_weight * _softplus_neg(z)


def _bce_terms(view: View, p: Mapping[str, Any]) -> Terms:
    z, y = logits_and_targets(view)
    return Terms(bce_terms(z, y, _pos_weight(view, p, z)))


def _margin_products(view: View) -> torch.Tensor:
    """t·z with t = 2y − 1 in {−1, 1}."""
    z, y = logits_and_targets(view, hard=True)
    return (2 * y - 1) * z


def _hinge_terms(view: View, p: Mapping[str, Any]) -> Terms:
    return Terms(torch.clamp(p["margin"] - _margin_products(view), min=0))


def _squared_hinge_terms(view: View, p: Mapping[str, Any]) -> Terms:
    h = torch.clamp(p["margin"] - _margin_products(view), min=0)
    return Terms(h * h)


def _exponential_terms(view: View, p: Mapping[str, Any]) -> Terms:
    # float64 so that only a genuine float64 overflow (t·z < −709.78) gives inf; it is reported, never clipped.
    tz = _margin_products(view).to(torch.float64)
    loss = torch.exp(-tz)
    overflow = torch.isinf(loss) & torch.isfinite(tz)
    if bool(overflow.any()):
        view.diag("overflow", f"e^(−t·z) overflowed float64 for {int(overflow.sum())} elements (t·z < −709.78); the loss is inf")
    return Terms(loss)


def _sigmoid_focal_terms(view: View, p: Mapping[str, Any]) -> Terms:
    """α_t (1 − p_t)^γ · BCE, with 1 − p_t = σ(z)(1 − y) + σ(−z)·y computed without cancellation."""
    z, y = logits_and_targets(view)
    one_minus_pt = torch.sigmoid(z) * (1 - y) + torch.sigmoid(-z) * y
    loss = one_minus_pt ** p["gamma"] * bce_terms(z, y)
    alpha = p["alpha"]
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return Terms(loss)


def _segmentation(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits or probs as given, probabilities, targets), each [B, C, S] with the spatial dims flattened."""
    z, y = logits_and_targets(view, segmentation=True)
    if p["input_kind"] == "probs":
        bad = ~((z >= 0) & (z <= 1))
        if bool(bad.any()):
            i = first_index(bad)
            raise view.error(
                "logits", f"input_kind='probs' expects probabilities in [0, 1], got {float(z.reshape(-1)[i])!r} at flat index {i}"
            )
        prob = z
    else:
        prob = torch.sigmoid(z)
    b, c = z.shape[:2]
    return z.reshape(b, c, -1), prob.reshape(b, c, -1), y.reshape(b, c, -1)


def _dice_per_entry(prob: torch.Tensor, y: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 − (2Σpy + s) / (Σp + Σy + s) per (sample, channel)."""
    tp = (prob * y).sum(-1)
    return 1 - (2 * tp + smooth) / (prob.sum(-1) + y.sum(-1) + smooth)


def _dice_terms(view: View, p: Mapping[str, Any]) -> Terms:
    _, prob, y = _segmentation(view, p)
    return Terms(_dice_per_entry(prob, y, p["smooth"]))


def _bce_from_probs(view: View, prob: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−(y log p + (1 − y) log(1 − p)) with 0·log 0 = 0; a certain wrong probability gives inf (torch would clamp to 100)."""
    loss = -(torch.xlogy(y, prob) + torch.xlogy(1 - y, 1 - prob))
    infinite = torch.isinf(loss)
    if bool(infinite.any()):
        view.diag("overflow", f"{int(infinite.sum())} BCE terms are inf: probability exactly 0 or 1 against the target; the loss is inf")
    return loss


def _dice_bce_terms(view: View, p: Mapping[str, Any]) -> Terms:
    """dice_weight · dice + bce_weight · (mean BCE over the entry's spatial elements), per (sample, channel)."""
    z, prob, y = _segmentation(view, p)
    dice = _dice_per_entry(prob, y, p["smooth"])
    bce = bce_terms(z, y) if p["input_kind"] == "logits" else _bce_from_probs(view, prob, y)
    return Terms(p["dice_weight"] * dice + p["bce_weight"] * bce.mean(-1))


def _tversky_terms(view: View, p: Mapping[str, Any]) -> Terms:
    """1 − (TP + s) / (TP + α·FP + β·FN + s) per (sample, channel), FP = Σp(1 − y), FN = Σ(1 − p)y as monai."""
    _, prob, y = _segmentation(view, p)
    tp = (prob * y).sum(-1)
    fp = (prob * (1 - y)).sum(-1)
    fn = ((1 - prob) * y).sum(-1)
    s = p["smooth"]
    return Terms(1 - (tp + s) / (tp + p["alpha"] * fp + p["beta"] * fn + s))


_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, 3), "targets": binary_targets(rng, n, 3)})
_SEGMENTATION_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, 2, 3, 5, 5), "targets": binary_targets(rng, 2, 3, 5, 5)})


bce_with_logits = mean_loss(
    name="bce_with_logits",
    family="binary",
    summary="binary cross-entropy on logits, soft targets allowed: max(z, 0) − z·y + log(1 + e^(−|z|)), pos_weight on the y term",
    roles=(LOGITS, TARGETS),
    params=(
        Param(
            "pos_weight",
            "float_or_list",
            None,
            "weight of the positive term: a scalar, or one value per channel of dim 1 ([C])",
            minimum=0.0,
            nullable=True,
        ),
    ),
    terms=_bce_terms,
    reference="torch.nn.functional.binary_cross_entropy_with_logits (pos_weight [C] reshaped to the channel dim 1)",
    example=_EXAMPLE,
)
hinge = mean_loss(
    name="hinge",
    family="binary",
    summary="max(0, m − t·z), t = 2y − 1",
    roles=(LOGITS, TARGETS),
    params=(MARGIN,),
    terms=_hinge_terms,
    reference="sklearn.metrics.hinge_loss (binary, margin 1); float64 formula",
    example=_EXAMPLE,
)
squared_hinge = mean_loss(
    name="squared_hinge",
    family="binary",
    summary="max(0, m − t·z)², t = 2y − 1",
    roles=(LOGITS, TARGETS),
    params=(MARGIN,),
    terms=_squared_hinge_terms,
    reference="float64 formula",
    example=_EXAMPLE,
)
exponential = mean_loss(
    name="exponential",
    family="binary",
    summary="e^(−t·z), t = 2y − 1 (AdaBoost); float64 overflow is inf and diagnosed",
    roles=(LOGITS, TARGETS),
    params=(),
    terms=_exponential_terms,
    reference="float64 formula",
    example=_EXAMPLE,
)
sigmoid_focal = mean_loss(
    name="sigmoid_focal",
    family="binary",
    summary="α_t (1 − p_t)^γ · BCE with p_t = p·y + (1 − p)(1 − y) (RetinaNet)",
    roles=(LOGITS, TARGETS),
    params=(
        Param(
            "alpha",
            "float",
            0.25,
            "α: weight of positives (negatives get 1 − α); null disables the weighting",
            minimum=0.0,
            maximum=1.0,
            nullable=True,
        ),
        Param("gamma", "float", 2.0, "γ: focusing exponent; 0 gives α-weighted BCE", minimum=0.0),
    ),
    terms=_sigmoid_focal_terms,
    reference="torchvision.ops.sigmoid_focal_loss formula (monai FocalLoss equal)",
    example=_EXAMPLE,
)
dice = mean_loss(
    name="dice",
    family="binary",
    summary="1 − (2Σpy + s)/(Σp + Σy + s) per (sample, channel) over the spatial dims, averaged",
    roles=(SEGMENTATION_LOGITS, SEGMENTATION_TARGETS),
    params=(SMOOTH, INPUT_KIND),
    terms=_dice_terms,
    reference="monai.losses.DiceLoss(sigmoid=True)",
    example=_SEGMENTATION_EXAMPLE,
)
dice_bce = mean_loss(
    name="dice_bce",
    family="binary",
    summary="dice_weight · dice + bce_weight · BCE, per (sample, channel) entry (BCE averaged over the entry's spatial elements)",
    roles=(SEGMENTATION_LOGITS, SEGMENTATION_TARGETS),
    params=(
        Param("dice_weight", "float", 1.0, "weight of the dice term (monai lambda_dice)", minimum=0.0),
        Param("bce_weight", "float", 1.0, "weight of the BCE term (monai lambda_ce)", minimum=0.0),
        SMOOTH,
        INPUT_KIND,
    ),
    terms=_dice_bce_terms,
    reference="monai.losses.DiceCELoss(sigmoid=True) (C = 1; monai switches to softmax CE for C > 1) / DiceLoss + binary_cross_entropy_with_logits",
    example=_SEGMENTATION_EXAMPLE,
)
tversky = mean_loss(
    name="tversky",
    family="binary",
    summary="1 − (TP + s)/(TP + α·FP + β·FN + s) per (sample, channel) over the spatial dims, averaged",
    roles=(SEGMENTATION_LOGITS, SEGMENTATION_TARGETS),
    params=(
        Param("alpha", "float", 0.5, "α: weight of false positives", minimum=0.0),
        Param("beta", "float", 0.5, "β: weight of false negatives", minimum=0.0),
        SMOOTH,
        INPUT_KIND,
    ),
    terms=_tversky_terms,
    reference="monai.losses.TverskyLoss(sigmoid=True)",
    example=_SEGMENTATION_EXAMPLE,
)

FUNCTIONS = (
    bce_with_logits,
    hinge,
    squared_hinge,
    exponential,
    sigmoid_focal,
    dice,
    dice_bce,
    tversky,
)
