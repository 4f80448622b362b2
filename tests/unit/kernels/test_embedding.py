"""Embedding losses against torch.nn.functional, pytorch-metric-learning and float64 formulas."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

from helpers import DTYPES, assert_close, tol
from lossd.kernels import Accumulator, InvalidInput, evaluate, get_function
from lossd.kernels.losses import embedding_inputs

NAMES = ("info_nce", "nt_xent", "supcon", "triplet", "contrastive_pair", "multi_similarity", "circle", "arcface", "cosface", "sphereface")


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    return out[name].value, out


def codes(out):
    return [d.code for d in out.diagnostics]


def low(shape, dtype, scale=1.0):
    """Random values rounded to ``dtype``; the oracle reads the same values in float64."""
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    return x, x.double()


def grouped_labels(n, classes=None):
    """Labels with several rows per class, in shuffled order."""
    classes = classes or max(2, n // 3)
    return torch.arange(n)[torch.randperm(n)] % classes


def sample(name, n=12, d=5, k=4):
    """A small valid batch for any embedding function."""
    x = torch.randn(n, d, dtype=torch.float64)
    if name == "info_nce":
        return {"query": x, "keys": x + 0.3 * torch.randn(n, d, dtype=torch.float64)}
    if name == "triplet":
        return {"anchor": x, "positive": torch.randn(n, d, dtype=torch.float64), "negative": torch.randn(n, d, dtype=torch.float64)}
    if name == "contrastive_pair":
        return {"x1": x, "x2": torch.randn(n, d, dtype=torch.float64), "similar": torch.randint(0, 2, (n,))}
    tensors = {"embeddings": x, "labels": grouped_labels(n)}
    if name in ("arcface", "cosface", "sphereface"):
        tensors["labels"] = torch.randint(0, k, (n,))
        tensors["class_weights"] = torch.randn(d, k, dtype=torch.float64)
    return tensors


# -- info_nce ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(1, 3), (3, 1), (257, 7)])
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_matches_cross_entropy(dtype, n, d, normalize):
    q, q64 = low((n, d), dtype)
    k, k64 = low((n, d), dtype)
    got, _ = run("info_nce", {"query": q, "keys": k}, normalize=normalize, temperature=0.5)
    if normalize:
        q64, k64 = F.normalize(q64, dim=1), F.normalize(k64, dim=1)
    ref = F.cross_entropy(q64 @ k64.T / 0.5, torch.arange(n))
    assert_close(got, ref.item(), **tol(dtype))


@pytest.mark.parametrize("temperature", [0.07, 1.0, 3.0])
def test_info_nce_symmetric_is_clip(temperature):
    q, k = torch.randn(33, 8, dtype=torch.float64), torch.randn(33, 8, dtype=torch.float64)
    got, _ = run("info_nce", {"query": q, "keys": k}, symmetric=True, temperature=temperature)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    labels = torch.arange(33)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close(got, ref.item(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17])
def test_info_nce_negative_keys_match_info_nce_pytorch(dtype, m):
    q, q64 = low((9, 6), dtype)
    k, k64 = low((9, 6), dtype)
    neg, neg64 = low((m, 6), dtype)
    got, _ = run("info_nce", {"query": q, "keys": k, "negative_keys": neg}, temperature=0.2)
    # info_nce_pytorch.info_nce(query, positive_key, negative_keys, negative_mode="unpaired")
    q64, k64, neg64 = (F.normalize(t, dim=1) for t in (q64, k64, neg64))
    logits = torch.cat([(q64 * k64).sum(1, keepdim=True), q64 @ neg64.T], dim=1) / 0.2
    ref = F.cross_entropy(logits, torch.zeros(9, dtype=torch.long))
    assert_close(got, ref.item(), **tol(dtype))


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_blocks_give_the_same_value(monkeypatch, symmetric):
    q, k = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    whole, _ = run("info_nce", {"query": q, "keys": k}, symmetric=symmetric)
    monkeypatch.setattr(embedding_inputs, "CHUNK_ELEMENTS", 7 * 50)  # 8 blocks of 7 rows, the last one short
    blocked, _ = run("info_nce", {"query": q, "keys": k}, symmetric=symmetric)
    assert_close(blocked, whole, rtol=1e-12)


def test_extreme_temperature_is_diagnosed_and_finite():
    q, k = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    got, out = run("info_nce", {"query": q, "keys": k}, temperature=1e-5)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 1e-5
    assert_close(got, F.cross_entropy(logits, torch.arange(6)).item(), rtol=1e-9)
    assert "extreme_temperature" in codes(out)
    _, calm = run("info_nce", {"query": q, "keys": k})
    assert calm.diagnostics == []


def test_info_nce_unnormalized_extreme_values():
    q = torch.tensor([[1e4, 0.0], [0.0, -1e4]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got, out = run("info_nce", {"query": q, "keys": k}, normalize=False, temperature=1.0)
    ref = F.cross_entropy(q.double() @ k.double().T, torch.arange(2))
    assert_close(got, ref.item(), rtol=1e-6)
    assert math.isfinite(got) and "extreme_temperature" in codes(out)


# -- nt_xent, supcon, multi_similarity, circle vs PML ------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, temperature", [(1, 0.07), (5, 0.5), (40, 0.07)])
def test_nt_xent_views_match_pml(dtype, n, temperature):
    x, x64 = low((2 * n, 8), dtype)
    got, _ = run("nt_xent", {"embeddings": x}, temperature=temperature)
    ref = pml.NTXentLoss(temperature=temperature)(x64, torch.arange(n).repeat(2))
    assert_close(got, ref.item(), **tol(dtype))


def test_nt_xent_views_are_simclr():
    # SimCLR's 2N-way softmax written directly: row i's target is i ± N, self excluded.
    n = 10
    z = F.normalize(torch.randn(2 * n, 6, dtype=torch.float64), dim=1)
    logits = (z @ z.T / 0.1).fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    got, _ = run("nt_xent", {"embeddings": z}, temperature=0.1)
    assert_close(got, F.cross_entropy(logits, target).item(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 40])
def test_nt_xent_labels_match_pml(dtype, n):
    x, x64 = low((n, 5), dtype)
    y = grouped_labels(n)
    got, _ = run("nt_xent", {"embeddings": x, "labels": y})
    assert_close(got, pml.NTXentLoss()(x64, y).item(), **tol(dtype))


def test_nt_xent_without_negatives_is_zero_as_pml():
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    got, _ = run("nt_xent", {"embeddings": x, "labels": y})
    assert got == pytest.approx(0.0, abs=1e-12)
    assert pml.NTXentLoss()(x, y).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, classes, temperature", [(3, 2, 0.1), (31, 4, 0.9), (100, 30, 0.1)])
def test_supcon_matches_pml(dtype, n, classes, temperature):
    x, x64 = low((n, 6), dtype)
    y = grouped_labels(n, classes)
    got, _ = run("supcon", {"embeddings": x, "labels": y}, temperature=temperature)
    assert_close(got, pml.SupConLoss(temperature=temperature)(x64, y).item(), **tol(dtype))


def test_supcon_rows_without_positives_are_left_out():
    # Labels 5 and 6 are singletons: AvgNonZeroReducer averages the other rows only.
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 5, 6])
    got, _ = run("supcon", {"embeddings": x, "labels": y})
    assert_close(got, pml.SupConLoss()(x, y).item(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n, params", [(2, {}), (9, {"alpha": 1.0, "beta": 10.0, "base": 0.0}), (9, {"alpha": 5.0, "beta": 80.0, "base": 0.8}), (70, {})]
)
def test_multi_similarity_matches_pml(dtype, n, params):
    x, x64 = low((n, 5), dtype)
    y = grouped_labels(n)
    got, _ = run("multi_similarity", {"embeddings": x, "labels": y}, **params)
    assert_close(got, pml.MultiSimilarityLoss(**params)(x64, y).item(), **tol(dtype))


def test_multi_similarity_with_distinct_labels_matches_pml():
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.arange(6)
    got, _ = run("multi_similarity", {"embeddings": x, "labels": y})
    assert_close(got, pml.MultiSimilarityLoss()(x, y).item(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, params", [(3, {}), (10, {"m": 0.25, "gamma": 256.0}), (10, {"m": 0.0, "gamma": 1.0}), (65, {})])
def test_circle_matches_pml(dtype, n, params):
    x, x64 = low((n, 5), dtype)
    y = grouped_labels(n)
    got, _ = run("circle", {"embeddings": x, "labels": y}, **params)
    assert_close(got, pml.CircleLoss(**params)(x64, y).item(), **tol(dtype))


def test_circle_singletons_and_blocks(monkeypatch):
    x = torch.randn(11, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 4, 4, 9])
    ref = pml.CircleLoss()(x, y).item()
    got, _ = run("circle", {"embeddings": x, "labels": y})
    assert_close(got, ref, rtol=1e-12)
    monkeypatch.setattr(embedding_inputs, "CHUNK_ELEMENTS", 3 * 11)
    for name, oracle in [("circle", ref), ("supcon", pml.SupConLoss()(x, y).item()), ("nt_xent", pml.NTXentLoss()(x, y).item())]:
        got, _ = run(name, {"embeddings": x, "labels": y})
        assert_close(got, oracle, rtol=1e-12, what=name)


# -- arcface / cosface / sphereface -----------------------------------------------------------
def pml_margin_loss(cls, w, x, y, **params):
    with warnings.catch_warnings():
        # PML builds SphereFace's binomials with a torch tensor fed to scipy (a NumPy 2 deprecation).
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*__array_wrap__.*")
        loss = cls(num_classes=w.shape[1], embedding_size=w.shape[0], **params).double()
    loss.W.data = w.clone()
    return loss(x, y).item()


MARGIN_CASES = [
    ("arcface", pml.ArcFaceLoss, {}),
    ("arcface", pml.ArcFaceLoss, {"margin": 10.0, "scale": 8.0}),
    ("arcface", pml.ArcFaceLoss, {"margin": 120.0, "scale": 2.0}),  # θ > π − m takes the monotone branch
    ("cosface", pml.CosFaceLoss, {}),
    ("cosface", pml.CosFaceLoss, {"margin": 0.1, "scale": 16.0}),
    ("sphereface", pml.SphereFaceLoss, {}),
    ("sphereface", pml.SphereFaceLoss, {"margin": 1}),
    ("sphereface", pml.SphereFaceLoss, {"margin": 3, "scale": 2.0}),
]


@pytest.mark.parametrize("name, cls, params", MARGIN_CASES)
@pytest.mark.parametrize("n, k", [(1, 1), (17, 3), (40, 10)])
def test_margin_softmax_matches_pml(name, cls, params, n, k):
    x = torch.randn(n, 6, dtype=torch.float64) * 2
    w = torch.randn(6, k, dtype=torch.float64)
    y = torch.randint(0, k, (n,))
    got, _ = run(name, {"embeddings": x, "labels": y, "class_weights": w}, **params)
    assert_close(got, pml_margin_loss(cls, w, x, y, **params), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, cls", [("arcface", pml.ArcFaceLoss), ("cosface", pml.CosFaceLoss), ("sphereface", pml.SphereFaceLoss)])
def test_margin_softmax_dtypes(dtype, name, cls, monkeypatch):
    x, x64 = low((40, 5), dtype)
    w, w64 = low((5, 7), dtype)
    y = torch.randint(0, 7, (40,))
    monkeypatch.setattr(embedding_inputs, "CHUNK_ELEMENTS", 9 * 7)  # several row blocks
    got, _ = run(name, {"embeddings": x, "labels": y, "class_weights": w}, scale=16.0)
    ref = pml_margin_loss(cls, w64, x64, y, scale=16.0)
    assert_close(got, ref, **tol(dtype))


def test_margin_softmax_extreme_scale_is_diagnosed():
    x = torch.randn(8, 4, dtype=torch.float64) * 100
    tensors = {"embeddings": x, "labels": torch.randint(0, 3, (8,)), "class_weights": torch.randn(4, 3, dtype=torch.float64)}
    got, out = run("sphereface", tensors, scale=64.0)
    assert math.isfinite(got) and "extreme_temperature" in codes(out)


# -- triplet and contrastive_pair --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 257])
@pytest.mark.parametrize("params", [{}, {"margin": 0.3, "p": 1.0}, {"margin": 2.0, "p": 3.0, "swap": True}, {"margin": 0.05, "swap": True}])
def test_triplet_matches_torch(dtype, n, params):
    (a, a64), (p, p64), (q, q64) = (low((n, 4), dtype) for _ in range(3))
    got, _ = run("triplet", {"anchor": a, "positive": p, "negative": q}, **params)
    ref = F.triplet_margin_loss(a64, p64, q64, **params)
    assert_close(got, ref.item(), **tol(dtype))


def test_triplet_zero_distances():
    a = torch.ones(3, 2, dtype=torch.float64)
    got, _ = run("triplet", {"anchor": a, "positive": a, "negative": a})
    assert_close(got, F.triplet_margin_loss(a, a, a).item(), rtol=1e-12)


def contrastive_reference(x1, x2, y, margin=1.0):
    d = torch.sqrt(((x1.double() - x2.double()) ** 2).sum(1))
    return (y.double() * d**2 + (1 - y.double()) * torch.clamp(margin - d, min=0) ** 2).mean().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("margin", [0.0, 1.0, 4.0])
def test_contrastive_pair_matches_formula(dtype, n, margin):
    (x1, x1_64), (x2, x2_64) = low((n, 3), dtype), low((n, 3), dtype)
    y = torch.randint(0, 2, (n,))
    got, _ = run("contrastive_pair", {"x1": x1, "x2": x2, "similar": y}, margin=margin)
    assert_close(got, contrastive_reference(x1_64, x2_64, y, margin), **tol(dtype))


@pytest.mark.parametrize("similar", [torch.tensor([True, False]), torch.tensor([1.0, 0.0]), torch.tensor([1, 0], dtype=torch.int32)])
def test_contrastive_pair_zero_distance_and_label_dtypes(similar):
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    got, _ = run("contrastive_pair", {"x1": x, "x2": x.clone(), "similar": similar}, margin=2.0)
    assert got == pytest.approx((0.0 + 4.0) / 2, rel=1e-12)


# -- non-splittable: declared, refused when split, mean over whole batches ------------------------
@pytest.mark.parametrize("name", NAMES)
def test_declared_non_splittable(name):
    fdef = get_function(name)
    assert fdef.family == "embedding" and not fdef.splittable and not fdef.is_splittable({})


@pytest.mark.parametrize("name", NAMES)
def test_split_batch_is_refused(name):
    tensors = sample(name)
    part1 = {k: v[:6] for k, v in tensors.items() if k != "class_weights"}
    part2 = {k: v[6:] for k, v in tensors.items() if k != "class_weights"}
    if "class_weights" in tensors:
        part1["class_weights"] = part2["class_weights"] = tensors["class_weights"]
    acc = Accumulator([name])
    acc.add(part1, batch_id="b")
    with pytest.raises(InvalidInput, match=f"{name} is not splittable") as info:
        acc.add(part2, batch_id="b")
    assert info.value.violations[0].field == "functions[0].name"


@pytest.mark.parametrize("name", NAMES)
def test_stream_reports_the_mean_of_batch_values(name):
    batches = [sample(name, n=n) for n in (6, 9, 12)]
    acc = Accumulator([name])
    for i, b in enumerate(batches):
        acc.add(b, batch_id=str(i))
    result = acc.result()[name]
    expected = sum(evaluate(b, [name])[name].value for b in batches) / 3
    assert_close(result.value, expected, rtol=1e-12)
    assert result.denominator == 3 and result.denominator_kind == "batches"


# -- batches without a valid pair: 0 as in PML, counted in the state ------------------------------------
PAIR_LOSSES = {
    "nt_xent": lambda: pml.NTXentLoss(temperature=0.07),
    "supcon": lambda: pml.SupConLoss(temperature=0.1),
    "multi_similarity": lambda: pml.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
    "circle": lambda: pml.CircleLoss(m=0.4, gamma=80),
}
NO_PAIR_BATCHES = {  # kind -> labels of a 5-row batch (or 1 row)
    "single_row_batches": torch.zeros(1, dtype=torch.int64),
    "no_negative_batches": torch.zeros(5, dtype=torch.int64),
    "no_positive_batches": torch.arange(5),
}
# MultiSimilarity's positive and negative terms are separate: only a single row has no pair.
HAS_A_PAIR = {("multi_similarity", "no_negative_batches"), ("multi_similarity", "no_positive_batches")}


@pytest.mark.parametrize("kind", sorted(NO_PAIR_BATCHES))
@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_a_batch_without_a_valid_pair_follows_pml(name, kind):
    y = NO_PAIR_BATCHES[kind]
    x = torch.randn(y.numel(), 6, dtype=torch.float64)
    oracle = float(PAIR_LOSSES[name]()(x, y))
    value, out = run(name, {"embeddings": x, "labels": y})
    assert_close(value, oracle, rtol=1e-9, atol=1e-12, what=f"{name} on {kind}")
    state = evaluate({"embeddings": x, "labels": y}, [name], return_state=True)[name].state
    assert state is not None
    counted = {f: float(state.fields[f]) for f in NO_PAIR_BATCHES}
    if (name, kind) in HAS_A_PAIR:
        assert oracle != 0 and "no_valid_pair" not in codes(out) and sum(counted.values()) == 0
    else:
        assert value == 0.0 and codes(out) == ["no_valid_pair"]
        assert counted == {f: float(f == kind) for f in NO_PAIR_BATCHES}
        assert out.diagnostics[0].severity == "warning" and "counts as a batch" in out.diagnostics[0].message


def test_nt_xent_two_views_of_one_sample_has_no_negative_pair():
    x = torch.randn(2, 6, dtype=torch.float64)  # rows 0 and 1: two views of sample 0, no other sample
    value, out = run("nt_xent", {"embeddings": x})
    assert value == float(pml.NTXentLoss(temperature=0.07)(x, torch.zeros(2, dtype=torch.int64))) == 0.0
    assert codes(out) == ["no_valid_pair"] and "every label equal" in out.diagnostics[0].message


@pytest.mark.parametrize("name", ["nt_xent", "supcon", "circle"])
def test_no_pair_counts_add_up_over_merged_batches(name):
    good = {"embeddings": torch.randn(8, 6, dtype=torch.float64), "labels": torch.arange(8) % 3}
    batches = [
        good,
        {"embeddings": torch.randn(1, 6, dtype=torch.float64), "labels": torch.zeros(1)},
        {"embeddings": torch.randn(4, 6, dtype=torch.float64), "labels": torch.arange(4)},
        {"embeddings": torch.randn(3, 6, dtype=torch.float64), "labels": torch.arange(3)},
    ]
    acc = Accumulator([name])
    for i, b in enumerate(batches):
        acc.add(b, batch_id=str(i))
    # The same batches merged as states from elsewhere (ranks, files): the counts travel in the state.
    merged = Accumulator([name])
    for b in batches:
        merged.add_state(name, evaluate(b, [name], return_state=True)[name].state)
    oracle = PAIR_LOSSES[name]()
    expected = sum(float(oracle(b["embeddings"], b["labels"].long())) for b in batches) / 4
    for result in (acc.result(), merged.result()):
        assert_close(result[name].value, expected, rtol=1e-9, what=f"{name} mean over batches")
        assert result[name].denominator == 4 and result[name].denominator_kind == "batches"
        (d,) = [d for d in result.diagnostics if d.code == "no_valid_pair"]
        assert "3 of 4 batches had no valid pair" in d.message, d.message
        assert "1 with a single embedding" in d.message and "2 with every label distinct" in d.message


def test_list_functions_text_says_how_batches_without_pairs_count():
    for name in PAIR_LOSSES:
        fdef = get_function(name)
        assert "no valid pair contributes 0 and counts as a batch" in fdef.summary
        assert "counts as a batch" in fdef.outputs[0].doc


# -- errors -------------------------------------------------------------------------------------------
X = torch.randn(6, 4)


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        ("info_nce", {"query": X, "keys": X[:5]}, {}, "tensors.keys", r"expected the shape of query \[6, 4\]"),
        ("info_nce", {"query": X, "keys": X, "negative_keys": torch.randn(3, 2)}, {}, "tensors.negative_keys", r"\[M, 4\]"),
        (
            "info_nce",
            {"query": X, "keys": X, "negative_keys": torch.randn(3, 4)},
            {"symmetric": True},
            "functions[0].params.symmetric",
            "in-batch",
        ),
        ("info_nce", {"query": X, "keys": X}, {"temperature": 0.0}, "functions[0].params.temperature", "> 0"),
        ("info_nce", {"query": X[0], "keys": X[0]}, {}, "tensors.query", r"expected shape \[N, D\]"),
        ("info_nce", {"query": torch.randn(0, 4), "keys": torch.randn(0, 4)}, {}, "tensors.query", "at least one row"),
        ("info_nce", {"query": torch.randint(0, 3, (6, 4)), "keys": X}, {}, "tensors.query", "floating-point"),
        ("info_nce", {"keys": X}, {}, "tensors.query", "needs role 'query'"),
        ("nt_xent", {"embeddings": torch.randn(5, 4)}, {}, "tensors.embeddings", "odd row count 5"),
        ("nt_xent", {"embeddings": X, "labels": torch.arange(5)}, {}, "tensors.labels", r"expected shape \[6\]"),
        ("supcon", {"embeddings": X, "labels": torch.tensor([0, 0, 1, 1, 2, 2.5])}, {}, "tensors.labels", "non-integer"),
        ("supcon", {"embeddings": X}, {}, "tensors.labels", "needs role 'labels'"),
        ("multi_similarity", {"embeddings": X, "labels": torch.arange(6)}, {"beta": -1.0}, "functions[0].params.beta", "> 0"),
        ("triplet", {"anchor": X, "positive": X, "negative": X[:, :3]}, {}, "tensors.negative", "expected the shape of anchor"),
        ("triplet", {"anchor": X, "positive": X, "negative": X}, {"p": 0.0}, "functions[0].params.p", "> 0"),
        ("triplet", {"anchor": X, "positive": X, "negative": X}, {"margin": 0.0}, "functions[0].params.margin", "> 0"),
        ("contrastive_pair", {"x1": X, "x2": X, "similar": torch.full((6,), 0.5)}, {}, "tensors.similar", r"expected values in \{0, 1\}"),
        ("contrastive_pair", {"x1": X, "x2": X, "similar": torch.ones(4)}, {}, "tensors.similar", r"expected shape \[6\]"),
        (
            "arcface",
            {"embeddings": X, "labels": torch.tensor([0, 1, 2, 3, 0, 1]), "class_weights": torch.randn(4, 3)},
            {},
            "tensors.labels",
            r"\[0, 3\)",
        ),
        (
            "arcface",
            {"embeddings": X, "labels": torch.zeros(6), "class_weights": torch.randn(3, 4)},
            {},
            "tensors.class_weights",
            r"expected shape \[4, K\]",
        ),
        (
            "arcface",
            {"embeddings": X, "labels": torch.zeros(6), "class_weights": torch.randn(4, 3)},
            {"margin": 180.0},
            "functions[0].params.margin",
            "180",
        ),
        (
            "sphereface",
            {"embeddings": X, "labels": torch.zeros(6), "class_weights": torch.randn(4, 3)},
            {"margin": 1.5},
            "functions[0].params.margin",
            "integer",
        ),
        (
            "cosface",
            {"embeddings": X, "labels": torch.zeros(6), "class_weights": torch.randn(4, 3)},
            {"reduction": "sum"},
            "functions[0].params.reduction",
            "unknown parameter",
        ),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field
