"""recall_at_k and mrr against sklearn's top_k_accuracy_score and label_ranking_average_precision_score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, assert_merge_exact
from lossd.kernels import InvalidInput, evaluate


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    return out[name], [d.code for d in out.diagnostics]


def value(name, tensors, **params):
    return run(name, tensors, **params)[0].value


def retrieval(n=257, m=31, d=8, dtype=torch.float64):
    q = torch.randn(n, d, dtype=torch.float64).to(dtype)
    keys = torch.randn(m, d, dtype=torch.float64).to(dtype)
    return {"query": q, "keys": keys, "relevant": torch.randint(0, m, (n,))}


def scores(t, similarity):
    q, k = t["query"].double(), t["keys"].double()
    if similarity == "cosine":
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return (q @ k.t()).numpy()


def one_hot(relevant, m):
    y = np.zeros((len(relevant), m), dtype=int)
    y[np.arange(len(relevant)), relevant] = 1
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_recall_at_k_matches_sklearn(dtype, similarity, k):
    t = retrieval(dtype=dtype)
    ref = skm.top_k_accuracy_score(t["relevant"].numpy(), scores(t, similarity), k=k, labels=np.arange(31))
    r, _ = run("recall_at_k", t, k=k, similarity=similarity)
    assert_close(r.value, ref, rtol=1e-12)
    assert r.denominator == 257 and r.denominator_kind == "samples"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_mrr_matches_label_ranking_average_precision(dtype, similarity):
    t = retrieval(dtype=dtype)
    ref = skm.label_ranking_average_precision_score(one_hot(t["relevant"].numpy(), 31), scores(t, similarity))
    assert_close(value("mrr", t, similarity=similarity), ref, rtol=1e-12)


def test_ties_count_pessimistically():
    # Integer embeddings: many exactly tied scores. LRAP ranks ties pessimistically too.
    t = {
        "query": torch.randint(-2, 3, (64, 3)).double(),
        "keys": torch.randint(-2, 3, (20, 3)).double(),
        "relevant": torch.randint(0, 20, (64,)),
    }
    s = scores(t, "dot")
    ref = skm.label_ranking_average_precision_score(one_hot(t["relevant"].numpy(), 20), s)
    assert_close(value("mrr", t), ref, rtol=1e-12)
    rank = (s >= s[np.arange(64), t["relevant"].numpy()][:, None]).sum(1)
    for k in (1, 2, 5):
        assert_close(value("recall_at_k", t, k=k), np.mean(rank <= k), rtol=1e-12)


def test_constant_scores_get_the_worst_rank():
    t = {"query": torch.zeros(4, 3), "keys": torch.randn(5, 3), "relevant": torch.tensor([0, 1, 2, 4])}
    for similarity in ("dot", "cosine"):  # a zero query scores 0 against every key
        assert_close(value("mrr", t, similarity=similarity), 1 / 5, rtol=1e-12)
        assert value("recall_at_k", t, k=4, similarity=similarity) == 0.0
        assert value("recall_at_k", t, k=5, similarity=similarity) == 1.0


def test_edge_shapes():
    t = retrieval(n=1, m=1, d=1)
    assert value("mrr", t) == 1.0 and value("recall_at_k", t) == 1.0
    t = retrieval(n=5, m=4)
    assert value("recall_at_k", t, k=100) == 1.0
    big = {"query": torch.tensor([[1e4, 0.0]]), "keys": torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]]), "relevant": torch.tensor([1])}
    assert value("mrr", big) == 1.0


def test_nan_scores_give_nan():
    t = retrieval(n=4, m=3)
    t["query"][0, 0] = math.nan
    r, codes = run("mrr", t)
    assert math.isnan(r.value) and "nan_or_inf" in codes


def test_empty_query_set_is_nan():
    t = retrieval(n=0, m=3)
    r, codes = run("recall_at_k", t)
    assert math.isnan(r.value) and r.denominator == 0 and "all_ignored" in codes


@pytest.mark.parametrize("name", ["recall_at_k", "mrr"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_merge_over_query_splits_is_exact(name, similarity):
    t = retrieval(n=101, m=17, dtype=torch.float32)
    spec = {"name": name, "params": {"similarity": similarity}}
    assert_merge_exact(t, spec, parts=5, split_keys=["query", "relevant"])


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        ("mrr", {"query": torch.randn(3, 4), "keys": torch.randn(5, 3), "relevant": torch.tensor([0, 1, 2])}, {}, "tensors.keys", "D=4"),
        (
            "mrr",
            {"query": torch.randn(3, 4), "keys": torch.randn(5, 4), "relevant": torch.tensor([0, 1, 5])},
            {},
            "tensors.relevant",
            r"\[0, 5\)",
        ),
        (
            "mrr",
            {"query": torch.randn(3, 4), "keys": torch.randn(5, 4), "relevant": torch.tensor([0, 1])},
            {},
            "tensors.relevant",
            r"expected shape \[3\]",
        ),
        ("mrr", {"query": torch.randn(4), "keys": torch.randn(5, 4), "relevant": torch.tensor([0])}, {}, "tensors.query", r"\[N, D\]"),
        (
            "mrr",
            {"query": torch.randn(3, 4), "keys": torch.randn(0, 4), "relevant": torch.tensor([0, 0, 0])},
            {},
            "tensors.keys",
            "at least one key",
        ),
        (
            "mrr",
            {"query": torch.randn(3, 4), "keys": torch.randn(5, 4), "relevant": torch.tensor([0.5, 1, 2])},
            {},
            "tensors.relevant",
            "non-integer",
        ),
        ("mrr", {"query": torch.randn(3, 4), "keys": torch.randn(5, 4)}, {}, "tensors.relevant", "needs role"),
        (
            "recall_at_k",
            {"query": torch.randn(3, 4), "keys": torch.randn(5, 4), "relevant": torch.tensor([0, 1, 2])},
            {"k": 0},
            "functions[0].params.k",
            ">= 1",
        ),
        (
            "recall_at_k",
            {"query": torch.randn(3, 4), "keys": torch.randn(5, 4), "relevant": torch.tensor([0, 1, 2])},
            {"similarity": "l2"},
            "functions[0].params.similarity",
            "one of",
        ),
        (
            "mrr",
            {"query": torch.randint(0, 3, (3, 4)), "keys": torch.randn(5, 4), "relevant": torch.tensor([0, 1, 2])},
            {},
            "tensors.query",
            "floating-point",
        ),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field
