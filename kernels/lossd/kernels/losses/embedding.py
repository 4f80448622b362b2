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
rows, all positive/negative pairs, its reducers), which are their oracles;
batches on which those losses have no term at all are refused rather than
reported as PML's placeholder 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lossd.kernels.params import Param
from lossd.kernels.plan import CHUNK_ELEMENTS, View
from lossd.kernels.reduce import batch_loss
from lossd.kernels.registry import Role, register

__all__ = ["EXTREME_LOGIT", "EMBEDDINGS", "LABELS"]

# |similarity / temperature| beyond this saturates softmax: the extreme_temperature diagnostic.
EXTREME_LOGIT = 1e3

EMBEDDINGS = Role("embeddings", "[N, D]", "float", "one embedding per row")
LABELS = Role("labels", "[N]", "index", "class of each row; rows sharing a label are positives")
TEMPERATURE_DOC = "τ: similarities are divided by it before the softmax"


# -- inputs -----------------------------------------------------------------
def _matrix(view: View, role: str) -> torch.Tensor:
    """A float [N, D] tensor with N >= 1 and D >= 1, as sent."""
    x = view.scores(role)
    view.expect_ndim(role, x, (2,), "[N, D]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise view.error(role, f"expected at least one row and one column, got shape {list(x.shape)}")
    return x


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _same_shape(view: View, role: str, t: torch.Tensor, like: torch.Tensor, like_role: str) -> None:
    if tuple(t.shape) != tuple(like.shape):
        raise view.error(role, f"expected the shape of {view.tensor_name(like_role)} {list(like.shape)}, got {list(t.shape)}")


def _row_labels(view: View, n: int) -> torch.Tensor:
    y = view.index_labels("labels")
    if tuple(y.shape) != (n,):
        raise view.error("labels", f"expected shape [{n}] (one label per embedding row), got {list(y.shape)}")
    return y


def _binary01(view: View, role: str, n: int) -> torch.Tensor:
    """A [n] tensor of exact 0/1 values (bool, integer or float), as float."""
    t = view.tensor(role)
    if tuple(t.shape) != (n,):
        raise view.error(role, f"expected shape [{n}], got {list(t.shape)}")
    t = t.to(torch.float64)
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0][0])
        raise view.error(role, f"expected values in {{0, 1}}, got {float(t[first])!r} at index {first}")
    return t


# -- shared pieces ------------------------------------------------------------
def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Slices of anchor rows whose [rows, n_cols] similarity block holds about CHUNK_ELEMENTS entries."""
    step = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _not_self(block: slice, n: int, device: torch.device) -> torch.Tensor:
    """[rows, n] mask that is False where a row meets itself (column index == row index)."""
    rows = torch.arange(block.start, block.stop, device=device)
    return rows[:, None] != torch.arange(n, device=device)[None, :]


def _masked_lse(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row logsumexp over the kept entries; −inf for a row that keeps none."""
    return torch.logsumexp(x.masked_fill(~keep, -math.inf), dim=1)


class _Scale:
    """Tracks the largest |logit| seen, for the extreme_temperature diagnostic."""

    def __init__(self) -> None:
        self.max = 0.0

    def see(self, logits: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        a = logits.abs() if keep is None else logits.abs().masked_fill(~keep, 0)
        if a.numel():
            self.max = max(self.max, float(a.max()))

    def report(self, view: View, what: str) -> None:
        if self.max > EXTREME_LOGIT:
            view.diag(
                "extreme_temperature",
                f"{what} reach |{self.max:.3g}| > {EXTREME_LOGIT:g}: the softmax saturates and the loss is dominated by "
                "single pairs; check the temperature/scale and whether embeddings are normalized",
            )


def _temperature(p: Mapping[str, Any]) -> float:
    return float(p["temperature"])


def _pair_masks(y: torch.Tensor, block: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) of a block of anchors: same label other row, different label."""
    same = y[block, None] == y[None, :]
    return same & _not_self(block, y.shape[0], y.device), ~same


def _require_pairs(view: View, y: torch.Tensor, *, negatives: bool) -> None:
    """Refuse batches on which a pair loss has no term (PML would return a placeholder 0)."""
    counts = torch.unique(y, return_counts=True)[1]
    if not bool((counts > 1).any()):
        raise view.error(
            "labels", "no two rows share a label, so there is no positive pair and the loss has no term; send a batch with positives"
        )
    if negatives and counts.numel() < 2:
        raise view.error(
            "labels",
            "every row has the same label, so there is no negative pair and the loss has no term; send a batch with several classes",
        )


# -- info_nce ---------------------------------------------------------------------
def _info_nce(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    q, k = _matrix(view, "query"), _matrix(view, "keys")
    _same_shape(view, "keys", k, q, "query")
    negatives = view.optional("negative_keys")
    tensors = [q, k] if negatives is None else [q, k, _matrix(view, "negative_keys")]
    if negatives is not None and negatives.shape[1] != q.shape[1]:
        raise view.error("negative_keys", f"expected shape [M, {q.shape[1]}] (the query width), got {list(negatives.shape)}")
    if negatives is not None and p["symmetric"]:
        raise view.param_error(
            "symmetric", "symmetric=true (CLIP) uses in-batch negatives in both directions; it is not defined with negative_keys"
        )
    dtype = _common_dtype(*tensors)
    q, k, *rest = (t.to(dtype) for t in tensors)
    neg = rest[0] if rest else None
    if p["normalize"]:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        neg = None if neg is None else F.normalize(neg, dim=1)
    tau, n, scale = _temperature(p), q.shape[0], _Scale()
    if neg is not None:
        # info_nce_pytorch ("unpaired"): query i scores its own key against the M negative keys only.
        pos = (q * k).sum(dim=1) / tau
        total = torch.zeros((), dtype=dtype, device=q.device)
        for block in _row_blocks(n, neg.shape[0]):
            logits = q[block] @ neg.T / tau
            scale.see(logits)
            total = total + (torch.logaddexp(pos[block], torch.logsumexp(logits, dim=1)) - pos[block]).sum()
        scale.see(pos)
        scale.report(view, "query·key / temperature logits")
        return total / n
    rows = torch.zeros((), dtype=dtype, device=q.device)
    col_lse = torch.full((n,), -math.inf, dtype=dtype, device=q.device)
    diag = torch.empty(n, dtype=dtype, device=q.device)
    for block in _row_blocks(n, n):
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


info_nce = register(
    batch_loss(
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
    )
)


# -- nt_xent and supcon ----------------------------------------------------------------
def _views_or_labels(view: View, x: torch.Tensor) -> torch.Tensor:
    """Labels, or for [2N, D] views without labels: rows i and i+N share label i."""
    if view.has("labels"):
        return _row_labels(view, x.shape[0])
    if x.shape[0] % 2:
        raise view.error(
            "embeddings",
            f"without labels, embeddings hold two views [2N, D] (rows i and i+N are a positive pair); got an odd row count {x.shape[0]}",
        )
    return torch.arange(x.shape[0] // 2, device=x.device).repeat(2)


def _nt_xent(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    x = _matrix(view, "embeddings")
    y = _views_or_labels(view, x)
    _require_pairs(view, y, negatives=False)
    xn = F.normalize(x.to(_common_dtype(x)), dim=1)
    tau, n, scale = _temperature(p), x.shape[0], _Scale()
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    pairs = 0
    for block in _row_blocks(n, n):
        logits = xn[block] @ xn.T / tau
        pos, neg = _pair_masks(y, block)
        scale.see(logits, pos | neg)
        # PML NTXentLoss: each positive pair (a, p) is a softmax over {p} ∪ negatives(a); mean over pairs.
        per_pair = torch.logaddexp(logits, _masked_lse(logits, neg)[:, None]) - logits
        total = total + torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum()
        pairs += int(pos.sum())
    scale.report(view, "cosine similarity / temperature logits")
    return total / pairs


nt_xent = register(
    batch_loss(
        name="nt_xent",
        family="embedding",
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
        reference="pytorch_metric_learning.losses.NTXentLoss (mean over positive pairs)",
    )
)


def _supcon(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    x = _matrix(view, "embeddings")
    y = _row_labels(view, x.shape[0])
    _require_pairs(view, y, negatives=True)
    xn = F.normalize(x.to(_common_dtype(x)), dim=1)
    tau, n, scale = _temperature(p), x.shape[0], _Scale()
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    nonzero = 0
    for block in _row_blocks(n, n):
        logits = xn[block] @ xn.T / tau
        pos, _ = _pair_masks(y, block)
        others = _not_self(block, n, xn.device)
        scale.see(logits, others)
        log_prob = logits - _masked_lse(logits, others)[:, None]
        n_pos = pos.sum(dim=1)
        summed = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        row = torch.where(n_pos > 0, -summed / n_pos.clamp(min=1), torch.zeros_like(summed))
        # PML's AvgNonZeroReducer: the mean over rows whose loss is > 0 (rows without positives are 0).
        kept = row > 0
        total = total + torch.where(kept, row, torch.zeros_like(row)).sum()
        nonzero += int(kept.sum())
    scale.report(view, "cosine similarity / temperature logits")
    return total / nonzero if nonzero else total


supcon = register(
    batch_loss(
        name="supcon",
        family="embedding",
        summary="supervised contrastive loss (Khosla et al. 2020): per anchor, the mean log-probability of its positives among all other rows",
        roles=(EMBEDDINGS, LABELS),
        params=(Param("temperature", "float", 0.1, TEMPERATURE_DOC, minimum=0.0, exclusive_minimum=True),),
        value=_supcon,
        reference="pytorch_metric_learning.losses.SupConLoss (AvgNonZeroReducer: mean over anchors with a non-zero loss)",
    )
)


# -- multi_similarity and circle --------------------------------------------------------
def _normalized_with_labels(view: View) -> tuple[torch.Tensor, torch.Tensor]:
    x = _matrix(view, "embeddings")
    y = _row_labels(view, x.shape[0])
    return F.normalize(x.to(_common_dtype(x)), dim=1), y


def _multi_similarity(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    xn, y = _normalized_with_labels(view)
    n = xn.shape[0]
    if n < 2:
        raise view.error("embeddings", "expected at least 2 rows (the loss is over pairs of rows), got 1")
    alpha, beta, base = p["alpha"], p["beta"], p["base"]
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    scale = _Scale()
    for block in _row_blocks(n, n):
        sim = xn[block] @ xn.T
        pos, neg = _pair_masks(y, block)
        pos_arg, neg_arg = alpha * (base - sim), beta * (sim - base)
        scale.see(pos_arg, pos)
        scale.see(neg_arg, neg)
        zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
        # log(1 + Σ exp(·)) over each row's positives / negatives; 0 for a row without any.
        pos_loss = torch.logaddexp(zero, _masked_lse(pos_arg, pos)) / alpha
        neg_loss = torch.logaddexp(zero, _masked_lse(neg_arg, neg)) / beta
        total = total + (pos_loss + neg_loss).sum()
    scale.report(view, "multi-similarity exponents α(base − s) and β(s − base)")
    return total / n  # PML MeanReducer over anchors


multi_similarity = register(
    batch_loss(
        name="multi_similarity",
        family="embedding",
        summary="multi-similarity loss (Wang et al. 2019) over all pairs, no miner: soft weighting of positive and negative cosine similarities",
        roles=(EMBEDDINGS, LABELS),
        params=(
            Param("alpha", "float", 2.0, "weight of positive pairs", minimum=0.0, exclusive_minimum=True),
            Param("beta", "float", 50.0, "weight of negative pairs", minimum=0.0, exclusive_minimum=True),
            Param("base", "float", 0.5, "similarity offset λ applied to both"),
        ),
        value=_multi_similarity,
        reference="pytorch_metric_learning.losses.MultiSimilarityLoss (MeanReducer over anchors)",
    )
)


def _circle(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    xn, y = _normalized_with_labels(view)
    _require_pairs(view, y, negatives=True)
    m, gamma = p["m"], p["gamma"]
    n = xn.shape[0]
    total = torch.zeros((), dtype=xn.dtype, device=xn.device)
    nonzero = 0
    scale = _Scale()
    for block in _row_blocks(n, n):
        s = xn[block] @ xn.T
        pos, neg = _pair_masks(y, block)
        # Optimum o_p = 1 + m, o_n = −m; margins Δ_p = 1 − m, Δ_n = m; α weights carry no gradient.
        sp = -gamma * torch.relu(1 + m - s) * (s - (1 - m))
        sn = gamma * torch.relu(s + m) * (s - m)
        scale.see(sp, pos)
        scale.see(sn, neg)
        z = _masked_lse(sp, pos) + _masked_lse(sn, neg)
        row = torch.logaddexp(torch.zeros_like(z), z)  # softplus; −inf (no positive or no negative) gives 0
        row = torch.where(pos.any(dim=1) & neg.any(dim=1), row, torch.zeros_like(row))
        kept = row > 0
        total = total + torch.where(kept, row, torch.zeros_like(row)).sum()
        nonzero += int(kept.sum())
    scale.report(view, "circle-loss logits")
    return total / nonzero if nonzero else total


circle = register(
    batch_loss(
        name="circle",
        family="embedding",
        summary="circle loss (Sun et al. 2020) with pair labels: self-paced weighting of cosine similarities around optima 1+m and −m",
        roles=(EMBEDDINGS, LABELS),
        params=(
            Param("m", "float", 0.4, "relaxation margin", minimum=0.0),
            Param("gamma", "float", 80.0, "scale factor γ", minimum=0.0, exclusive_minimum=True),
        ),
        value=_circle,
        reference="pytorch_metric_learning.losses.CircleLoss (AvgNonZeroReducer over anchors)",
    )
)


# -- triplet and contrastive_pair --------------------------------------------------------
def _triplet(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    a = _matrix(view, "anchor")
    pos, neg = _matrix(view, "positive"), _matrix(view, "negative")
    _same_shape(view, "positive", pos, a, "anchor")
    _same_shape(view, "negative", neg, a, "anchor")
    dtype = _common_dtype(a, pos, neg)
    a, pos, neg = a.to(dtype), pos.to(dtype), neg.to(dtype)
    norm = p["p"]
    # torch semantics: d(x, y) = ‖x − y + eps‖_p with eps = 1e-6.
    d_ap = F.pairwise_distance(a, pos, p=norm, eps=1e-6)
    d_an = F.pairwise_distance(a, neg, p=norm, eps=1e-6)
    if p["swap"]:
        d_an = torch.minimum(d_an, F.pairwise_distance(pos, neg, p=norm, eps=1e-6))
    return torch.clamp_min(p["margin"] + d_ap - d_an, 0).mean()


triplet = register(
    batch_loss(
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
    )
)


def _contrastive_pair(view: View, p: Mapping[str, Any]) -> torch.Tensor:
    x1, x2 = _matrix(view, "x1"), _matrix(view, "x2")
    _same_shape(view, "x2", x2, x1, "x1")
    dtype = _common_dtype(x1, x2)
    y = _binary01(view, "similar", x1.shape[0]).to(dtype)
    diff = x1.to(dtype) - x2.to(dtype)
    sq = (diff * diff).sum(dim=1)  # d² directly: exact at d = 0, no sqrt round trip
    far = torch.relu(p["margin"] - torch.sqrt(sq))
    return (y * sq + (1 - y) * far * far).mean()


contrastive_pair = register(
    batch_loss(
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
    )
)


# -- arcface / cosface / sphereface ---------------------------------------------------------
def _arcface_target(cos: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    m = math.radians(p["margin"])
    theta = torch.acos(cos.clamp(-1, 1))
    # cos(θ + m) while θ + m stays below π; beyond it PML continues monotonically with cos θ − m·sin m.
    return torch.where(theta <= math.pi - m, torch.cos(theta + m), cos - m * math.sin(m))


def _cosface_target(cos: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    return cos - p["margin"]


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
        x = _matrix(view, "embeddings")
        w = _matrix(view, "class_weights")
        if w.shape[0] != x.shape[1]:
            raise view.error(
                "class_weights", f"expected shape [{x.shape[1]}, K] (embedding width D rows, one column per class), got {list(w.shape)}"
            )
        y = _row_labels(view, x.shape[0])
        view.check_labels("labels", y, w.shape[1], None)
        dtype = _common_dtype(x, w)
        x = x.to(dtype)
        xn, wn = F.normalize(x, dim=1), F.normalize(w.to(dtype), dim=0)
        factor = p["scale"] * (
            torch.linalg.vector_norm(x, dim=1) if scale_by_norm else torch.ones(x.shape[0], dtype=dtype, device=x.device)
        )
        total = torch.zeros((), dtype=dtype, device=x.device)
        scale = _Scale()
        for block in _row_blocks(x.shape[0], w.shape[1]):
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

arcface = register(
    batch_loss(
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
    )
)

cosface = register(
    batch_loss(
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
    )
)

sphereface = register(
    batch_loss(
        name="sphereface",
        family="embedding",
        summary="SphereFace multiplicative angular margin softmax: the label's logit is ‖x‖·s·ψ(mθ), other logits ‖x‖·s·cos θ",
        roles=_MARGIN_ROLES,
        params=(
            Param("margin", "int", 4, "integer angular multiplier m", minimum=1),
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
    )
)
