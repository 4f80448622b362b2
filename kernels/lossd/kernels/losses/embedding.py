"""Contrastive and metric-learning losses on embeddings [N, D].

Every function here is non-splittable (CATALOGUE.md): in-batch negatives make
a row's loss depend on the other rows, so a batch is evaluated whole and a
stream reports the mean of per-batch values (:func:`reduce.batch_loss`).
Triplet and contrastive-pair losses are per-row, but the catalogue declares
the whole family non-splittable and they follow it.

Similarity matrices are built a block of anchor rows at a time (about
``CHUNK_ELEMENTS`` entries per block), so a CLIP-sized batch never
materializes its whole N x N matrix.  The pair losses reproduce
pytorch-metric-learning's conventions (cosine similarity of L2-normalized
rows, all positive/negative pairs, its reducers), which are their oracles,
and so does a batch without a valid pair: its value is 0, as in PML, and the
state counts it (:mod:`lossd.kernels.losses.embedding_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lossd.kernels.budget import pairwise
from lossd.kernels.declarations import Example, Role
from lossd.kernels.examples import D, normal
from lossd.kernels.losses.embedding_inputs import (
    LogitScale,
    binary01,
    common_dtype,
    masked_lse,
    matrix,
    not_self,
    pair_labels,
    pair_masks,
    row_blocks,
    row_labels,
    same_shape,
    temperature,
)
from lossd.kernels.losses.embedding_pairs import PairLossValue, missing_pairs, pair_loss
from lossd.kernels.params import Param
from lossd.kernels.reduce import batch_loss
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "EMBEDDINGS", "LABELS"]

# |similarity / temperature| beyond this saturates softmax: the extreme_temperature diagnostic.

EMBEDDINGS = Role("embeddings", "[N, D]", "float", "one embedding per row")
LABELS = Role("labels", "[N]", "index", "class of each row; rows sharing a label are positives")
TEMPERATURE_DOC = "τ: similarities are divided by it before the softmax"


_LABELLED_EXAMPLE = Example(lambda rng, n: {"embeddings": normal(rng, n, D), "labels": pair_labels(n)})
# Rows i and i + N are two views: the pairing does not survive concatenating batches.
_TWO_VIEWS_EXAMPLE = Example(lambda rng, n: {"embeddings": normal(rng, 2 * max(2, n // 2), D)}, rows=False)
_QUERY_KEYS_EXAMPLE = Example(lambda rng, n: {"query": normal(rng, n, D), "keys": normal(rng, n, D)})
_TRIPLET_EXAMPLE = Example(lambda rng, n: {"anchor": normal(rng, n, D), "positive": normal(rng, n, D), "negative": normal(rng, n, D)})
_PAIRS_EXAMPLE = Example(
    lambda rng, n: {"x1": normal(rng, n, D), "x2": normal(rng, n, D), "similar": (np.arange(n) % 2).astype(np.float32)}
)


# -- info_nce ---------------------------------------------------------------------
def _info_nce(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    q, k = matrix(view, "query"), matrix(view, "keys")
    same_shape(view, "keys", k, q, "query")
    negatives = view.optional("negative_keys")
    tensors = [q, k] if negatives is None else [q, k, matrix(view, "negative_keys")]
    if negatives is not None and negatives.shape[1] != q.shape[1]:
        raise view.error("negative_keys", f"expected shape [M, {q.shape[1]}] (the query width), got {list(negatives.shape)}")
    if negatives is not None and p["symmetric"]:
        raise view.param_error(
            "symmetric", "symmetric=true (CLIP) uses in-batch negatives in both directions; it is not defined with negative_keys"
        )
    dtype = common_dtype(*tensors)
    q, k, *rest = (t.to(dtype) for t in tensors)
    neg = rest[0] if rest else None
    if p["normalize"]:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        neg = None if neg is None else F.normalize(neg, dim=1)
    tau, n, scale = temperature(p), q.shape[0], LogitScale()
    if neg is not None:
        # info_nce_pytorch ("unpaired"): query i scores its own key against the M negative keys only.
        pos = (q * k).sum(dim=1) / tau
        total = torch.zeros((), dtype=dtype, device=q.device)
        for block in row_blocks(n, neg.shape[0]):
            logits = q[block] @ neg.T / tau
            scale.see(logits)
            total = total + (torch.logaddexp(pos[block], torch.logsumexp(logits, dim=1)) - pos[block]).sum()
        scale.see(pos)
        scale.report(view, "query·key / temperature logits")
        return total / n
    rows = torch.zeros((), dtype=dtype, device=q.device)
    col_lse = torch.full((n,), -math.inf, dtype=dtype, device=q.device)
    diag = torch.empty(n, dtype=dtype, device=q.device)
    for block in row_blocks(n, n):
        logits = q[block] @ k.T / tau
        scale.see(logits)
        diag[block] = torch.diagonal(logits, offset=block.start)
        rows = rows + (torch.logsumexp(logits, dim=1) - diag[block]).sum()
        if p["symmetric"]:
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    scale.report(view, "query·key / temperature logits")
    if not p["symmetric"]:
        return rows / n
    return (rows / n + (col_lse - diag).mean()) / 2


info_nce = batch_loss(
    name="info_nce",
    family="embedding",
    summary="InfoNCE: cross-entropy over query·key/τ with the positive key on the diagonal (in-batch negatives), or against explicit negative keys",
    roles=(
        Role("query", "[N, D]", "float", "query embeddings"),
        Role("keys", "[N, D]", "float", "keys; row i is query i's positive, the other rows its in-batch negatives"),
        Role(
            "negative_keys",
            "[M, D]",
            "float",
            "explicit negatives shared by all queries; when sent, the candidates of query i are key i and these M keys only (info_nce_pytorch)",
            optional=True,
        ),
    ),
    params=(
        Param("temperature", "float", 0.1, TEMPERATURE_DOC, minimum=0.0, exclusive_minimum=True),
        Param("symmetric", "bool", False, "mean of the query->key and key->query losses (CLIP); in-batch negatives only"),
        Param("normalize", "bool", True, "L2-normalize rows first (cosine similarity); false uses raw dot products"),
    ),
    value=_info_nce,
    reference="torch.nn.functional.cross_entropy on the similarity matrix; info_nce_pytorch.info_nce formula with negative_keys",
    example=_QUERY_KEYS_EXAMPLE,
)


# -- nt_xent and supcon ----------------------------------------------------------------
def _views_or_labels(view: View, x: torch.Tensor) -> torch.Tensor:
    """Labels, or for [2N, D] views without labels: rows i and i+N share label i."""
    if view.has("labels"):
        return row_labels(view, x.shape[0])
    if x.shape[0] % 2:
        raise view.error(
            "embeddings",
            f"without labels, embeddings hold two views [2N, D] (rows i and i+N are a positive pair); got an odd row count {x.shape[0]}",
        )
    return torch.arange(x.shape[0] // 2, device=x.device).repeat(2)


def _no_pair(x: torch.Tensor, missing: str) -> PairLossValue:
    """PML's value of a batch without a valid pair: 0, with what it lacked."""
    return torch.zeros((), dtype=common_dtype(x), device=x.device), missing


def _nt_xent(view: View, p: Mapping[str, Any]) -> PairLossValue:
    x = matrix(view, "embeddings")
    y = _views_or_labels(view, x)
    missing = missing_pairs(y, needs_both=True)  # PML NTXentLoss needs a positive and a negative pair
    if missing:
        return _no_pair(x, missing)
    xn = F.normalize(x.to(common_dtype(x)), dim=1)
    tau, n, scale = temperature(p), x.shape[0], LogitScale()
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    pairs = 0
    for block in row_blocks(n, n):
        logits = xn[block] @ xn.T / tau
        pos, neg = pair_masks(y, block)
        scale.see(logits, pos | neg)
        # PML NTXentLoss: each positive pair (a, p) is a softmax over {p} ∪ negatives(a); mean over pairs.
        per_pair = torch.logaddexp(logits, masked_lse(logits, neg)[:, None]) - logits
        total = total + torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum()
        pairs += int(pos.sum())
    scale.report(view, "cosine similarity / temperature logits")
    return total / pairs, ""


nt_xent = pair_loss(
    name="nt_xent",
    summary="SimCLR NT-Xent: 2N-way cosine softmax; rows i and i+N are views of one sample, or positives are rows sharing a label",
    roles=(
        Role(
            "embeddings",
            "[2N, D] (two views) or [N, D] with labels",
            "float",
            "rows i and i+N are two views of sample i unless labels are sent",
        ),
        Role("labels", "[N]", "index", "class of each row; every same-label pair is a positive (PML NTXentLoss)", optional=True),
    ),
    params=(Param("temperature", "float", 0.07, TEMPERATURE_DOC, minimum=0.0, exclusive_minimum=True),),
    value=_nt_xent,
    needs_both=True,
    reference="pytorch_metric_learning.losses.NTXentLoss (mean over positive pairs)",
    example=_TWO_VIEWS_EXAMPLE,
)


def _supcon(view: View, p: Mapping[str, Any]) -> PairLossValue:
    x = matrix(view, "embeddings")
    y = row_labels(view, x.shape[0])
    missing = missing_pairs(y, needs_both=True)
    if missing:
        return _no_pair(x, missing)
    xn = F.normalize(x.to(common_dtype(x)), dim=1)
    tau, n, scale = temperature(p), x.shape[0], LogitScale()
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    nonzero = 0
    for block in row_blocks(n, n):
        logits = xn[block] @ xn.T / tau
        pos, _ = pair_masks(y, block)
        others = not_self(block, n, xn.device)
        scale.see(logits, others)
        log_prob = logits - masked_lse(logits, others)[:, None]
        n_pos = pos.sum(dim=1)
        summed = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        row = torch.where(n_pos > 0, -summed / n_pos.clamp(min=1), torch.zeros_like(summed))
        # PML's AvgNonZeroReducer: the mean over rows whose loss is > 0 (rows without positives are 0).
        kept = row > 0
        total = total + torch.where(kept, row, torch.zeros_like(row)).sum()
        nonzero += int(kept.sum())
    scale.report(view, "cosine similarity / temperature logits")
    return (total / nonzero if nonzero else total), ""


supcon = pair_loss(
    name="supcon",
    summary="supervised contrastive loss (Khosla et al. 2020): per anchor, the mean log-probability of its positives among all other rows",
    roles=(EMBEDDINGS, LABELS),
    params=(Param("temperature", "float", 0.1, TEMPERATURE_DOC, minimum=0.0, exclusive_minimum=True),),
    value=_supcon,
    needs_both=True,
    reference="pytorch_metric_learning.losses.SupConLoss (AvgNonZeroReducer: mean over anchors with a non-zero loss)",
    example=_LABELLED_EXAMPLE,
)


# -- multi_similarity and circle --------------------------------------------------------
def _normalized_with_labels(view: View) -> tuple[torch.Tensor, torch.Tensor]:
    x = matrix(view, "embeddings")
    y = row_labels(view, x.shape[0])
    return F.normalize(x.to(common_dtype(x)), dim=1), y


def _multi_similarity(view: View, p: Mapping[str, Any]) -> PairLossValue:
    xn, y = _normalized_with_labels(view)
    # Positive and negative terms are separate: any pair of rows gives the loss a term (PML).
    missing = missing_pairs(y, needs_both=False)
    if missing:
        return _no_pair(xn, missing)
    n = xn.shape[0]
    alpha, beta, base = p["alpha"], p["beta"], p["base"]
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    scale = LogitScale()
    for block in row_blocks(n, n):
        sim = xn[block] @ xn.T
        pos, neg = pair_masks(y, block)
        pos_arg, neg_arg = alpha * (base - sim), beta * (sim - base)
        scale.see(pos_arg, pos)
        scale.see(neg_arg, neg)
        zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
        # log(1 + Σ exp(·)) over each row's positives / negatives; 0 for a row without any.
        pos_loss = torch.logaddexp(zero, masked_lse(pos_arg, pos)) / alpha
        neg_loss = torch.logaddexp(zero, masked_lse(neg_arg, neg)) / beta
        total = total + (pos_loss + neg_loss).sum()
    scale.report(view, "multi-similarity exponents α(base − s) and β(s − base)")
    return total / n, ""  # PML MeanReducer over anchors


multi_similarity = pair_loss(
    name="multi_similarity",
    summary="multi-similarity loss (Wang et al. 2019) over all pairs, no miner: soft weighting of positive and negative cosine similarities",
    roles=(EMBEDDINGS, LABELS),
    params=(
        Param("alpha", "float", 2.0, "weight of positive pairs", minimum=0.0, exclusive_minimum=True),
        Param("beta", "float", 50.0, "weight of negative pairs", minimum=0.0, exclusive_minimum=True),
        Param("base", "float", 0.5, "similarity offset λ applied to both"),
    ),
    value=_multi_similarity,
    needs_both=False,
    reference="pytorch_metric_learning.losses.MultiSimilarityLoss (MeanReducer over anchors)",
    example=_LABELLED_EXAMPLE,
)


def _circle(view: View, p: Mapping[str, Any]) -> PairLossValue:
    xn, y = _normalized_with_labels(view)
    missing = missing_pairs(y, needs_both=True)
    if missing:
        return _no_pair(xn, missing)
    m, gamma = p["m"], p["gamma"]
    n = xn.shape[0]
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    nonzero = 0
    scale = LogitScale()
    for block in row_blocks(n, n):
        s = xn[block] @ xn.T
        pos, neg = pair_masks(y, block)
        # Optimum o_p = 1 + m, o_n = −m; margins Δ_p = 1 − m, Δ_n = m; α weights carry no gradient.
        sp = -gamma * torch.relu(1 + m - s) * (s - (1 - m))
        sn = gamma * torch.relu(s + m) * (s - m)
        scale.see(sp, pos)
        scale.see(sn, neg)
        z = masked_lse(sp, pos) + masked_lse(sn, neg)
        row = torch.logaddexp(torch.zeros_like(z), z)  # softplus; −inf (no positive or no negative) gives 0
        row = torch.where(pos.any(dim=1) & neg.any(dim=1), row, torch.zeros_like(row))
        kept = row > 0
        total = total + torch.where(kept, row, torch.zeros_like(row)).sum()
        nonzero += int(kept.sum())
    scale.report(view, "circle-loss logits")
    return (total / nonzero if nonzero else total), ""


circle = pair_loss(
    name="circle",
    summary="circle loss (Sun et al. 2020) with pair labels: self-paced weighting of cosine similarities around optima 1+m and −m",
    roles=(EMBEDDINGS, LABELS),
    params=(
        Param("m", "float", 0.4, "relaxation margin", minimum=0.0),
        Param("gamma", "float", 80.0, "scale factor γ", minimum=0.0, exclusive_minimum=True),
    ),
    value=_circle,
    needs_both=True,
    reference="pytorch_metric_learning.losses.CircleLoss (AvgNonZeroReducer over anchors)",
    example=_LABELLED_EXAMPLE,
)


# -- triplet and contrastive_pair --------------------------------------------------------
def _triplet(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    a = matrix(view, "anchor")
    pos, neg = matrix(view, "positive"), matrix(view, "negative")
    same_shape(view, "positive", pos, a, "anchor")
    same_shape(view, "negative", neg, a, "anchor")
    dtype = common_dtype(a, pos, neg)
    a, pos, neg = a.to(dtype), pos.to(dtype), neg.to(dtype)
    norm = p["p"]
    # torch semantics: d(x, y) = ‖x − y + eps‖_p with eps = 1e-6.
    d_ap = F.pairwise_distance(a, pos, p=norm, eps=1e-6)
    d_an = F.pairwise_distance(a, neg, p=norm, eps=1e-6)
    if p["swap"]:
        d_an = torch.minimum(d_an, F.pairwise_distance(pos, neg, p=norm, eps=1e-6))
    return torch.clamp_min(p["margin"] + d_ap - d_an, 0).mean()


triplet = batch_loss(
    name="triplet",
    family="embedding",
    summary="triplet margin loss max(0, d(a, p) − d(a, n) + margin), mean over triplets",
    roles=(
        Role("anchor", "[N, D]", "float", "anchor embeddings"),
        Role("positive", "[N, D]", "float", "positive of each anchor"),
        Role("negative", "[N, D]", "float", "negative of each anchor"),
    ),
    params=(
        Param(
            "margin",
            "float",
            1.0,
            "required gap between the negative and positive distances (torch requires > 0)",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Param("p", "float", 2.0, "norm degree of the pairwise distance", minimum=0.0, exclusive_minimum=True),
        Param("swap", "bool", False, "distance swap (Balntas et al. 2016): use min(d(a, n), d(p, n))"),
    ),
    value=_triplet,
    reference="torch.nn.functional.triplet_margin_loss",
    example=_TRIPLET_EXAMPLE,
)


def _contrastive_pair(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    x1, x2 = matrix(view, "x1"), matrix(view, "x2")
    same_shape(view, "x2", x2, x1, "x1")
    dtype = common_dtype(x1, x2)
    y = binary01(view, "similar", x1.shape[0]).to(dtype)
    diff = x1.to(dtype) - x2.to(dtype)
    sq = (diff * diff).sum(dim=1)  # d² directly: exact at d = 0, no sqrt round trip
    far = torch.relu(p["margin"] - torch.sqrt(sq))
    return (y * sq + (1 - y) * far * far).mean()


contrastive_pair = batch_loss(
    name="contrastive_pair",
    family="embedding",
    summary="margin contrastive loss for Siamese pairs: y·d² + (1 − y)·max(0, margin − d)², d the Euclidean distance",
    roles=(
        Role("x1", "[N, D]", "float", "first embedding of each pair"),
        Role("x2", "[N, D]", "float", "second embedding of each pair"),
        Role("similar", "[N]", "binary", "1 for a similar pair, 0 for a dissimilar one"),
    ),
    params=(Param("margin", "float", 1.0, "distance beyond which dissimilar pairs cost nothing", minimum=0.0),),
    value=_contrastive_pair,
    reference="float64 formula y·d² + (1 − y)·max(0, m − d)² (seed 002)",
    example=_PAIRS_EXAMPLE,
)

# Budgets (lossd.kernels.budget): the in-batch losses build N×N similarity matrices.
info_nce, nt_xent, supcon, multi_similarity, circle = (
    replace(f, memory=pairwise) for f in (info_nce, nt_xent, supcon, multi_similarity, circle)
)

FUNCTIONS = (
    info_nce,
    nt_xent,
    supcon,
    multi_similarity,
    circle,
    triplet,
    contrastive_pair,
)
