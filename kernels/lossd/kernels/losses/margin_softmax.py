"""Margin softmax losses on embeddings and class centres: ArcFace, CosFace, SphereFace.

The label's cosine with its class centre is replaced by a margin target
before a scaled softmax over all classes (pytorch-metric-learning's
conventions, its oracle).  Non-splittable like the rest of the embedding
family (CATALOGUE.md): a stream reports the mean of per-batch values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lossd.kernels.declarations import Example, Role
from lossd.kernels.examples import D, normal
from lossd.kernels.losses.embedding import EMBEDDINGS
from lossd.kernels.losses.embedding_inputs import LogitScale, common_dtype, matrix, pair_labels, row_blocks, row_labels
from lossd.kernels.params import Param
from lossd.kernels.reduce import batch_loss
from lossd.kernels.view import View

__all__ = ["FUNCTIONS"]

_MARGIN_EXAMPLE = Example(
    lambda rng, n: {"embeddings": normal(rng, n, D), "labels": pair_labels(n), "class_weights": normal(rng, D, 3)},
    shared=frozenset({"class_weights"}),
)


# -- arcface / cosface / sphereface ---------------------------------------------------------
def _arcface_target(cos: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    m = math.radians(p["margin"])
    theta = torch.acos(cos.clamp(-1, 1))
    # cos(θ + m) while θ + m stays below π; beyond it PML continues monotonically with cos θ − m·sin m.
    return torch.where(theta <= math.pi - m, torch.cos(theta + m), cos - m * math.sin(m))


def _cosface_target(cos: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    target: torch.Tensor = cos - p["margin"]
    return target


def _sphereface_target(cos: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k with cos(mθ) from the multiple-angle polynomial (PML, Liu et al. 2016)."""
    m = int(p["margin"])
    n = torch.arange(m // 2 + 1, dtype=cos.dtype, device=cos.device)
    binom = torch.tensor([math.comb(m, 2 * i) for i in range(m // 2 + 1)], dtype=cos.dtype, device=cos.device)
    c = cos[:, None]
    cos_m = ((-1.0) ** n * binom * c ** (m - 2 * n) * (1 - c * c) ** n).sum(dim=1)
    k = torch.floor(torch.acos(cos.clamp(-1, 1)) / (math.pi / m))
    return (-1.0) ** k * cos_m - 2 * k


TargetFn = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


def _margin_softmax(target_fn: TargetFn, scale_by_norm: bool) -> Callable[[View, Mapping[str, Any]], torch.Tensor]:
    """The value function of a margin softmax loss: CE over scale·cos with the label's cosine replaced."""

    def value(view: View, p: Mapping[str, Any]) -> torch.Tensor:
        x = matrix(view, "embeddings")
        w = matrix(view, "class_weights")
        if w.shape[0] != x.shape[1]:
            raise view.error(
                "class_weights", f"expected shape [{x.shape[1]}, K] (embedding width D rows, one column per class), got {list(w.shape)}"
            )
        y = row_labels(view, x.shape[0])
        view.check_labels("labels", y, w.shape[1], None)
        dtype = common_dtype(x, w)
        x = x.to(dtype)
        xn, wn = F.normalize(x, dim=1), F.normalize(w.to(dtype), dim=0)
        factor = p["scale"] * (
            torch.linalg.vector_norm(x, dim=1) if scale_by_norm else torch.ones(x.shape[0], dtype=dtype, device=x.device)
        )
        total = torch.zeros((), dtype=dtype, device=x.device)
        scale = LogitScale()
        for block in row_blocks(x.shape[0], w.shape[1]):
            cos = xn[block] @ wn
            label = y[block, None]
            target = target_fn(cos.gather(1, label).squeeze(1), p)
            logits = cos.scatter(1, label, target[:, None]) * factor[block, None]
            scale.see(logits)
            total = total + (torch.logsumexp(logits, dim=1) - logits.gather(1, label).squeeze(1)).sum()
        scale.report(view, "scaled margin-softmax logits")
        return total / x.shape[0]  # PML MeanReducer

    return value


_MARGIN_ROLES = (
    EMBEDDINGS,
    Role("labels", "[N]", "index", "class of each row, in [0, K)"),
    Role("class_weights", "[D, K]", "float", "class centres W (PML's W: one column per class); normalized by column"),
)
_SCALE_DOC = "s: the cosine logits are multiplied by it"

arcface = batch_loss(
    name="arcface",
    family="embedding",
    summary="ArcFace additive angular margin softmax: the label's logit is s·cos(θ + m)",
    roles=_MARGIN_ROLES,
    params=(
        Param(
            "margin",
            "float",
            28.6,
            "angular margin m in degrees (PML convention; 28.6° ≈ 0.5 rad)",
            minimum=0.0,
            maximum=180.0,
            exclusive_maximum=True,
        ),
        Param("scale", "float", 64.0, _SCALE_DOC, minimum=0.0, exclusive_minimum=True),
    ),
    value=_margin_softmax(_arcface_target, False),
    reference="pytorch_metric_learning.losses.ArcFaceLoss with W = class_weights",
    example=_MARGIN_EXAMPLE,
)

cosface = batch_loss(
    name="cosface",
    family="embedding",
    summary="CosFace additive cosine margin softmax: the label's logit is s·(cos θ − m)",
    roles=_MARGIN_ROLES,
    params=(
        Param("margin", "float", 0.35, "cosine margin m", minimum=0.0),
        Param("scale", "float", 64.0, _SCALE_DOC, minimum=0.0, exclusive_minimum=True),
    ),
    value=_margin_softmax(_cosface_target, False),
    reference="pytorch_metric_learning.losses.CosFaceLoss with W = class_weights",
    example=_MARGIN_EXAMPLE,
)

sphereface = batch_loss(
    name="sphereface",
    family="embedding",
    summary="SphereFace multiplicative angular margin softmax: the label's logit is ‖x‖·s·ψ(mθ), other logits ‖x‖·s·cos θ",
    roles=_MARGIN_ROLES,
    params=(
        Param("margin", "int", 4, "integer angular multiplier m", minimum=1, maximum=32),
        Param(
            "scale",
            "float",
            1.0,
            "s: logits are ‖x‖·s·cos (PML SphereFaceLoss default 1; the embedding norm already scales them)",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    ),
    value=_margin_softmax(_sphereface_target, True),
    reference="pytorch_metric_learning.losses.SphereFaceLoss with W = class_weights",
    example=_MARGIN_EXAMPLE,
)

FUNCTIONS = (arcface, cosface, sphereface)
