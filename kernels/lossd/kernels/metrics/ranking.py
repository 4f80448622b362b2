"""Retrieval metrics: recall@k and mean reciprocal rank of one relevant key per query.

Each query ``query[i]`` is scored against every key (dot product or cosine) and
the relevant key ``keys[relevant[i]]`` is ranked among them by raw score (any
sign).  Ties count pessimistically: every other key scoring at least as high
ranks ahead, so a constant scorer gets the worst rank, never a lucky one.

The state is (Σ hits or Σ 1/rank, query count): queries split freely over
batches, as long as every batch carries the full set of keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lossd.kernels.chunks import CHUNK_ELEMENTS
from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role
from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.examples import D, normal
from lossd.kernels.params import Param
from lossd.kernels.reduce import MEAN_FIELDS, all_ignored_check, finalize_mean, weighted_sums
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "recall_at_k", "mrr", "relevant_ranks"]

ROLES = (
    Role("query", "[N, D]", "float", "one embedding per query"),
    Role("keys", "[M, D]", "float", "the candidate keys, the same for every query (send them with every batch)"),
    Role("relevant", "[N]", "index", "index in [0, M) of each query's relevant key"),
)
SIMILARITY = Param(
    "similarity", "str", "dot", "dot: q·k; cosine: q·k / (‖q‖‖k‖), a zero vector scoring 0 against every key", choices=("dot", "cosine")
)

# Every query ranks the same 11 candidate keys: they are shared by the batches of a run.
_EXAMPLE = Example(
    lambda rng, n: {"query": normal(rng, n, D), "keys": normal(rng, 11, D), "relevant": rng.integers(0, 11, n)},
    shared=frozenset({"keys"}),
)


def _inputs(view: View, similarity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [N, D], keys [M, D], relevant [N]) validated, in a shared compute dtype."""
    q, keys = view.scores("query"), view.scores("keys")
    view.expect_ndim("query", q, (2,), "[N, D]")
    view.expect_ndim("keys", keys, (2,), "[M, D]")
    if keys.shape[1] != q.shape[1]:
        raise view.error("keys", f"expected width D={q.shape[1]} (as query), got shape {list(keys.shape)}")
    if keys.shape[0] == 0:
        raise view.error("keys", "expected at least one key, got shape [0, D]")
    relevant = view.index_labels("relevant")
    view.expect_shape("relevant", relevant, q.shape[:1], "one relevant key index per query")
    view.check_labels("relevant", relevant, keys.shape[0], None)
    dtype = torch.float64 if torch.float64 in (q.dtype, keys.dtype) else compute_dtype(q.dtype)
    q, keys = q.to(dtype), keys.to(dtype)
    if similarity == "cosine":
        q, keys = _unit(q), _unit(keys)
    return q, keys, relevant


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero (their cosine with anything is taken as 0)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def relevant_ranks(query: torch.Tensor, keys: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of each query's relevant key: #{keys j : s_j >= s_relevant}.

    Float64 ranks; NaN where the relevant score is NaN. Queries are processed in
    chunks so that the [N, M] score matrix never exists whole."""
    n, m = query.shape[0], keys.shape[0]
    ranks = torch.empty(n, dtype=torch.float64, device=query.device)
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n, step):
        scores = query[start : start + step] @ keys.t()
        own = scores.gather(1, relevant[start : start + step, None])
        at_least = (scores >= own).sum(dim=1).to(torch.float64)
        ranks[start : start + step] = torch.where(torch.isnan(own[:, 0]), torch.nan, at_least)
    return ranks


def _update(per_query: Any) -> Any:
    def update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        q, keys, relevant = _inputs(view, p["similarity"])
        values = per_query(relevant_ranks(q, keys, relevant), p)
        return weighted_sums(values, torch.ones_like(values))

    return update


def _finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    return finalize_mean(fields, "mean", "samples")


def _retrieval_metric(name: str, summary: str, params: tuple[Param, ...], per_query: Any, doc: str, reference: str) -> FunctionDef:
    """A mean over queries of ``per_query(rank)``: the variants differ only in that function."""
    return FunctionDef(
        name=name,
        family="metric",
        summary=summary,
        roles=ROLES,
        params=params + (SIMILARITY,),
        outputs=(Output("value", doc),),
        fields=MEAN_FIELDS,
        update=_update(per_query),
        finalize=_finalize,
        reference=reference,
        example=_EXAMPLE,
        finalize_diagnostics=all_ignored_check,
    )


recall_at_k = _retrieval_metric(
    "recall_at_k",
    "share of queries whose relevant key ranks in the top k (ties pessimistic)",
    (Param("k", "int", 1, "how many top-ranked keys count as retrieved", minimum=1),),
    lambda rank, p: torch.where(torch.isnan(rank), rank, (rank <= p["k"]).to(torch.float64)),
    "Σ [rank <= k] / N",
    "sklearn.metrics.top_k_accuracy_score on the [N, M] score matrix (tie-free inputs)",
)

mrr = _retrieval_metric(
    "mrr",
    "mean reciprocal rank of the relevant key (ties pessimistic)",
    (),
    lambda rank, p: 1.0 / rank,
    "Σ 1/rank / N",
    "sklearn.metrics.label_ranking_average_precision_score with one relevant key per query",
)

FUNCTIONS = (recall_at_k, mrr)
