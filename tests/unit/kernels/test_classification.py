"""The multiclass family beyond cross_entropy, against torch, scikit-learn and float64 formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import hinge_loss

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import InvalidInput, evaluate

SHAPES = [(1, 1), (257, 3), (5, 7, 3), (4, 3, 2, 5)]
SHAPES_K2 = [(1, 2), (257, 3), (5, 7, 3), (4, 3, 2, 5)]  # functions that need K >= 2
REDUCTIONS = ["mean", "sum", "none"]


def grid(shapes, default="mean", others=("sum", "none")):
    """(dtype, shape, reduction): every dtype and shape under the default reduction, the others on every shape in float32."""
    return [(dtype, shape, default) for dtype in DTYPES for shape in shapes] + [
        (torch.float32, shape, r) for shape in shapes for r in others
    ]


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    r = out[name]
    return (r.tensors["value"] if params.get("reduction") == "none" else r.value), out


def codes(out):
    return [d.code for d in out.diagnostics]


def logits_labels(shape, dtype=torch.float64, scale=3.0):
    z = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    return z, torch.randint(0, shape[1], shape[:1] + shape[2:])


def class_last(z):
    """[N, K, d...] -> [N·d..., K] for oracles that only take 2-D scores."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def reduce(per_element, reduction, denominator=None):
    if reduction == "none":
        return per_element
    total = per_element.sum()
    return total if reduction == "sum" else total / (per_element.numel() if denominator is None else denominator)


# -- nll ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, shape, reduction", grid(SHAPES))
def test_nll_matches_torch(dtype, shape, reduction):
    z, y = logits_labels(shape)
    lp = torch.log_softmax(z, 1).to(dtype)
    got, _ = run("nll", {"log_probs": lp, "labels": y}, reduction=reduction)
    assert_close(got, F.nll_loss(lp.double(), y, reduction=reduction).numpy(), **tol(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_weight_and_ignore_index(reduction):
    z, y = logits_labels((40, 5, 3))
    y[::3] = 4
    lp = torch.log_softmax(z, 1)
    w = torch.rand(5, dtype=torch.float64) + 0.1
    got, _ = run("nll", {"log_probs": lp, "labels": y}, weight=w.tolist(), ignore_index=4, reduction=reduction)
    assert_close(got, F.nll_loss(lp, y, weight=w, ignore_index=4, reduction=reduction).numpy(), rtol=1e-12, atol=1e-14)


def test_nll_all_ignored_and_sample_weights():
    lp = torch.log_softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    got, out = run("nll", {"log_probs": lp, "labels": torch.full((6,), -100)})
    assert got != got and out["nll"].denominator == 0 and "all_ignored" in codes(out)
    y = torch.randint(0, 3, (6,))
    sw = torch.rand(6, dtype=torch.float64)
    got, out = run("nll", {"log_probs": lp, "labels": y, "weights": sw})
    ref = (sw * F.nll_loss(lp, y, reduction="none")).sum() / sw.sum()
    assert_close(got, ref.item(), rtol=1e-12)
    assert out["nll"].denominator_kind == "weights"


# -- kl_div ------------------------------------------------------------------------------------------------------


def torch_kl(x, t, reduction, log_target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that reduction='mean' is not the true KL
        return F.kl_div(x, t, reduction=reduction, log_target=log_target)


@pytest.mark.parametrize("dtype, shape, reduction", grid([(1, 1), (257, 3), (5, 7, 3), (6,)], "batchmean", ("sum", "mean", "none")))
def test_kl_div_matches_torch(dtype, shape, reduction, log_target=False):
    x = torch.log_softmax(torch.randn(shape, dtype=torch.float64), -1).to(dtype)
    t = torch.softmax(torch.randn(shape, dtype=torch.float64), -1)
    t = (torch.log(t) if log_target else t).to(dtype)
    got, out = run("kl_div", {"log_probs": x, "target": t}, reduction=reduction, log_target=log_target)
    assert_close(got, torch_kl(x.double(), t.double(), reduction, log_target).numpy(), **tol(dtype))
    if reduction in ("batchmean", "mean"):
        r = out["kl_div"]
        assert (r.denominator, r.denominator_kind) == ((shape[0], "samples") if reduction == "batchmean" else (x.numel(), "elements"))


@pytest.mark.parametrize(
    "dtype, shape, reduction",
    [(torch.float16, (5, 7, 3), "batchmean"), *[(torch.float32, (9, 4), r) for r in ("batchmean", "sum", "mean", "none")]],
)
def test_kl_div_log_target(dtype, shape, reduction):
    test_kl_div_matches_torch(dtype, shape, reduction, log_target=True)


def test_kl_div_zero_target_contributes_zero_where_torch_gives_nan():
    """0·log(0/q) = 0 even for q = 0 (log_probs −inf); torch computes 0·(−inf) = NaN there."""
    x = torch.tensor([[float("-inf"), 0.0], [-0.5, -0.9]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [0.6, 0.4]], dtype=torch.float64)
    got, _ = run("kl_div", {"log_probs": x, "target": t}, reduction="sum")
    assert_close(got, torch_kl(x[1:], t[1:], "sum", False).item(), rtol=1e-12)
    got, _ = run("kl_div", {"log_probs": x, "target": torch.log(t)}, reduction="sum", log_target=True)
    assert_close(got, torch_kl(x[1:], t[1:], "sum", False).item(), rtol=1e-12)


def test_kl_div_refuses_negative_targets():
    with pytest.raises(InvalidInput, match="non-negative target") as info:
        run("kl_div", {"log_probs": torch.zeros(2, 2), "target": torch.tensor([[0.5, -0.5], [1.0, 0.0]])})
    assert info.value.violations[0].field == "tensors.target"


# -- distillation_kl ---------------------------------------------------------------------------------------------


def distillation_ref(s, t, temperature):
    s, t = s.double(), t.double()
    return F.kl_div(torch.log_softmax(s / temperature, 1), torch.softmax(t / temperature, 1), reduction="batchmean").item() * temperature**2


@pytest.mark.parametrize("dtype, shape, temperature", grid(SHAPES, 1.0, (4.0, 0.5)))
def test_distillation_kl_matches_formula(dtype, shape, temperature):
    s, _ = logits_labels(shape, dtype)
    t, _ = logits_labels(shape, dtype)
    got, out = run("distillation_kl", {"logits": s, "teacher_logits": t}, temperature=temperature)
    assert_close(got, distillation_ref(s, t, temperature), **tol(dtype))
    assert out["distillation_kl"].denominator == shape[0]


def test_distillation_kl_extremes_and_masked_teacher_classes():
    s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 1.0, 2.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0], [float("-inf"), 0.0, 1.0]])
    got, _ = run("distillation_kl", {"logits": s, "teacher_logits": t}, temperature=2.0)
    assert_close(got, distillation_ref(s, t.nan_to_num(neginf=-1e30), 2.0), rtol=1e-6)
    same, _ = run("distillation_kl", {"logits": s, "teacher_logits": s})
    assert same == 0.0


def test_distillation_kl_shape_mismatch():
    with pytest.raises(InvalidInput, match="shape of logits") as info:
        run("distillation_kl", {"logits": torch.randn(4, 3), "teacher_logits": torch.randn(4, 5)})
    assert info.value.violations[0].field == "tensors.teacher_logits"


# -- multi_margin ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, shape, reduction", grid(SHAPES))
def test_multi_margin_matches_torch(dtype, shape, reduction):
    z, y = logits_labels(shape, dtype, scale=1.0)
    got, _ = run("multi_margin", {"logits": z, "labels": y}, reduction=reduction)
    ref = F.multi_margin_loss(class_last(z.double()), y.reshape(-1), reduction=reduction)
    assert_close(got, ref.reshape(y.shape if reduction == "none" else ()).numpy(), **tol(dtype))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("margin", [1.0, 0.3, -0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multi_margin_params_and_weight(p, margin, reduction):
    z, y = logits_labels((31, 6), scale=1.0)
    w = torch.rand(6, dtype=torch.float64) + 0.1
    got, _ = run("multi_margin", {"logits": z, "labels": y}, p=p, margin=margin, weight=w.tolist(), reduction=reduction)
    ref = F.multi_margin_loss(z, y, p=p, margin=margin, weight=w, reduction=reduction)
    assert_close(got, ref.numpy(), rtol=1e-12, atol=1e-14)


def test_multi_margin_ignore_index_drops_rows():
    z, y = logits_labels((20, 4), scale=1.0)
    y[::3] = -100
    keep = y != -100
    got, _ = run("multi_margin", {"logits": z, "labels": y})
    assert_close(got, F.multi_margin_loss(z[keep], y[keep]).item(), rtol=1e-12)


# -- multiclass_hinge --------------------------------------------------------------------------------------------


def crammer_singer(z, y, margin):
    z = class_last(z.double())
    y = y.reshape(-1)
    zy = z[torch.arange(len(y)), y]
    others = z.clone()
    others[torch.arange(len(y)), y] = float("-inf")
    return (margin + others.max(1).values - zy).clamp_min(0)


@pytest.mark.parametrize("k", [3, 7])
def test_multiclass_hinge_matches_sklearn(k):
    z, y = logits_labels((57, k), scale=1.0)
    got, _ = run("multiclass_hinge", {"logits": z, "labels": y})
    assert_close(got, hinge_loss(y.numpy(), z.numpy(), labels=np.arange(k)), rtol=1e-12)
    sw = torch.rand(57, dtype=torch.float64)
    got, _ = run("multiclass_hinge", {"logits": z, "labels": y, "weights": sw})
    assert_close(got, hinge_loss(y.numpy(), z.numpy(), labels=np.arange(k), sample_weight=sw.numpy()), rtol=1e-12)


@pytest.mark.parametrize("dtype, shape, reduction", grid(SHAPES_K2))
def test_multiclass_hinge_matches_formula(dtype, shape, reduction, margin=0.25):
    z, y = logits_labels(shape, dtype, scale=1.0)
    got, _ = run("multiclass_hinge", {"logits": z, "labels": y}, margin=margin, reduction=reduction)
    assert_close(got, reduce(crammer_singer(z, y, margin), reduction).reshape(y.shape if reduction == "none" else ()).numpy(), **tol(dtype))


@pytest.mark.parametrize("margin", [0.0, 2.5, -1.0])
def test_multiclass_hinge_margin(margin):
    z, y = logits_labels((40, 5), scale=1.0)
    got, _ = run("multiclass_hinge", {"logits": z, "labels": y}, margin=margin)
    assert_close(got, crammer_singer(z, y, margin).mean().item(), rtol=1e-12, atol=1e-15)


def test_multiclass_hinge_ties_and_ignore_index():
    z = torch.tensor([[2.0, 2.0, 0.0], [3.0, 1.0, 3.0], [0.0, 5.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, -100])
    got, _ = run("multiclass_hinge", {"logits": z, "labels": y}, reduction="none")
    assert_close(got, [1.0, 1.0, 0.0])  # a tied runner-up gives exactly the margin
    got, out = run("multiclass_hinge", {"logits": z, "labels": y})
    assert got == 1.0 and out["multiclass_hinge"].denominator == 2


# -- focal -------------------------------------------------------------------------------------------------------


def focal_ref(z, y, gamma, alpha=None, ignore_index=-100):
    lp = torch.log_softmax(class_last(z.double()), 1)
    y = y.reshape(-1)
    valid = y != ignore_index
    yv = torch.where(valid, y, 0)
    log_py = lp[torch.arange(len(y)), yv]
    a = 1.0 if alpha is None else (torch.tensor(alpha, dtype=torch.float64)[yv] if isinstance(alpha, list) else alpha)
    return torch.where(valid, -a * (1 - log_py.exp()) ** gamma * log_py, 0.0), valid


@pytest.mark.parametrize("dtype, shape, reduction", grid(SHAPES))
def test_focal_matches_formula(dtype, shape, reduction):
    z, y = logits_labels(shape, dtype)
    got, _ = run("focal", {"logits": z, "labels": y}, reduction=reduction)
    ref, _ = focal_ref(z, y, 2.0)
    assert_close(got, reduce(ref, reduction).reshape(y.shape if reduction == "none" else ()).numpy(), **tol(dtype))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, [0.1, 0.5, 1.0, 2.0]])
def test_focal_gamma_alpha_ignore_index(gamma, alpha):
    z, y = logits_labels((50, 4))
    y[::5] = 3
    got, out = run("focal", {"logits": z, "labels": y}, gamma=gamma, alpha=alpha, ignore_index=3)
    ref, valid = focal_ref(z, y, gamma, alpha, ignore_index=3)
    assert_close(got, (ref.sum() / valid.sum()).item(), rtol=1e-12, atol=1e-14)
    assert out["focal"].denominator == int(valid.sum())  # α scales the loss; it is not a weight of the mean


def test_focal_gamma_zero_is_cross_entropy_and_extremes_are_finite():
    z, y = logits_labels((30, 5, 2))
    got, _ = run("focal", {"logits": z, "labels": y}, gamma=0.0)
    assert_close(got, F.cross_entropy(z, y).item(), rtol=1e-12)
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
    got, _ = run("focal", {"logits": z, "labels": torch.tensor([0, 0])}, reduction="none")
    assert_close(got, [0.0, 2e4], rtol=1e-6)  # confident and right: 0; confident and wrong: −log p_y


# -- adaptive_label_smoothing ------------------------------------------------------------------------------------


def adaptive_ref(z, y, base, minimum, ignore_index=-100):
    """Seed 001's AdaptiveLabelSmoothing, in float64 (its smoothed-label build fixed to a fresh tensor)."""
    logits = class_last(z.double())
    y = y.reshape(-1)
    valid = y != ignore_index
    yv = torch.where(valid, y, 0)
    k = logits.shape[1]
    probs = F.softmax(logits, dim=-1)
    confidence = probs.gather(1, yv.unsqueeze(1)).detach()
    eps = torch.clamp(base * (1.0 - confidence), min=minimum)
    smoothed = (eps / (k - 1)).expand_as(logits).clone()
    smoothed.scatter_(1, yv.unsqueeze(1), 1.0 - eps)
    loss = -(smoothed * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return torch.where(valid, loss, 0.0), valid


@pytest.mark.parametrize("dtype, shape, reduction", grid(SHAPES_K2))
def test_adaptive_label_smoothing_matches_seed_formula(dtype, shape, reduction):
    z, y = logits_labels(shape, dtype)
    got, _ = run("adaptive_label_smoothing", {"logits": z, "labels": y}, reduction=reduction)
    ref, _ = adaptive_ref(z, y, 0.1, 0.01)
    assert_close(got, reduce(ref, reduction).reshape(y.shape if reduction == "none" else ()).numpy(), **tol(dtype))


@pytest.mark.parametrize("base, minimum", [(0.1, 0.01), (0.5, 0.0), (0.05, 0.2), (0.0, 0.0)])
def test_adaptive_label_smoothing_params_and_ignore_index(base, minimum):
    z, y = logits_labels((40, 6))
    y[1::4] = -100
    got, _ = run("adaptive_label_smoothing", {"logits": z, "labels": y}, base_smoothing=base, min_smoothing=minimum)
    ref, valid = adaptive_ref(z, y, base, minimum)
    assert_close(got, (ref.sum() / valid.sum()).item(), rtol=1e-12)
    if base == 0.0 and minimum == 0.0:
        assert_close(got, F.cross_entropy(z, y).item(), rtol=1e-12)


# -- z_loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, shape, reduction", grid(SHAPES))
def test_z_loss_matches_formula(dtype, shape, reduction):
    z, _ = logits_labels(shape, dtype)
    got, _ = run("z_loss", {"logits": z}, reduction=reduction)
    ref = torch.logsumexp(z.double(), 1) ** 2
    assert_close(got, reduce(ref, reduction).numpy(), **tol(dtype))


def test_z_loss_weights_and_extremes():
    z = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    sw = torch.tensor([1.0, 3.0])
    got, _ = run("z_loss", {"logits": z, "weights": sw})
    assert_close(got, (1e8 + 3 * np.log(2) ** 2) / 4, rtol=1e-6)


# -- shared: merging, shared statistics, errors ------------------------------------------------------------------


def _merge_cases():
    z, y = logits_labels((97, 5, 3), torch.float32)
    y[7] = -100
    t = torch.randn(97, 5, 3)
    lp = torch.log_softmax(z, 1)
    q = torch.softmax(t, 1)
    return [
        ({"log_probs": lp, "labels": y}, {"name": "nll", "params": {"weight": [1.0, 2.0, 0.5, 1.0, 3.0]}}),
        ({"log_probs": lp, "target": q}, {"name": "kl_div"}),
        ({"log_probs": lp, "target": torch.log(q)}, {"name": "kl_div", "params": {"reduction": "mean", "log_target": True}}),
        ({"logits": z, "teacher_logits": t}, {"name": "distillation_kl", "params": {"temperature": 2.0}}),
        ({"logits": z, "labels": y}, {"name": "multi_margin", "params": {"p": 2, "weight": [1.0, 2.0, 0.5, 1.0, 3.0]}}),
        ({"logits": z, "labels": y}, {"name": "multiclass_hinge"}),
        ({"logits": z, "labels": y}, {"name": "focal", "params": {"alpha": [0.1, 0.2, 0.3, 0.4, 0.5]}}),
        ({"logits": z, "labels": y}, {"name": "adaptive_label_smoothing"}),
        ({"logits": z}, {"name": "z_loss"}),
    ]


@pytest.mark.parametrize("tensors, spec", _merge_cases(), ids=lambda v: v["name"] if isinstance(v, dict) and "name" in v else "")
def test_merge_is_exact(tensors, spec):
    assert_merge_exact(tensors, spec, parts=5)


def test_softmax_losses_share_one_pass_and_agree_with_each_other():
    z, y = logits_labels((64, 8))
    out = evaluate(
        {"logits": z, "labels": y},
        [
            "cross_entropy",
            {"name": "focal", "params": {"gamma": 0.0}},
            {"name": "adaptive_label_smoothing", "params": {"base_smoothing": 0.0, "min_smoothing": 0.0}},
            "z_loss",
        ],
    )
    assert_close(out["focal"].value, out["cross_entropy"].value, rtol=1e-12)
    assert_close(out["adaptive_label_smoothing"].value, out["cross_entropy"].value, rtol=1e-12)


def test_blocked_passes_match_with_tiny_chunks(monkeypatch):
    """Margins, the runner-up and the tempered softmax are computed block by block; tiny blocks change nothing."""
    from lossd.kernels import chunks

    z, y = logits_labels((9, 6, 5))
    t = torch.randn(9, 6, 5, dtype=torch.float64)
    specs = ["multi_margin", "multiclass_hinge", {"name": "distillation_kl", "params": {"temperature": 3.0}}, "focal"]
    whole = evaluate({"logits": z, "labels": y, "teacher_logits": t}, specs)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 7)
    blocked = evaluate({"logits": z, "labels": y, "teacher_logits": t}, specs)
    for alias, r in whole.results.items():
        assert_close(blocked[alias].value, r.value, rtol=1e-12, what=alias)


L34 = {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])}


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        ("nll", {"log_probs": torch.randn(4, 3), "labels": torch.tensor([0, 1, 3, 0])}, {}, "tensors.labels", "got 3 at flat index 2"),
        (
            "nll",
            {"log_probs": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            {"weight": [1.0]},
            "functions[0].params.weight",
            "expected 3 class weights",
        ),
        ("nll", {"labels": torch.tensor([0, 1, 2, 0])}, {}, "tensors.log_probs", "needs role 'log_probs'"),
        ("kl_div", {"log_probs": torch.randn(4, 3), "target": torch.rand(4, 2)}, {}, "tensors.target", r"expected shape \[4, 3\]"),
        (
            "kl_div",
            {"log_probs": torch.randn(4, 3), "target": torch.rand(4, 3)},
            {"reduction": "avg"},
            "functions[0].params.reduction",
            "batchmean",
        ),
        (
            "distillation_kl",
            {"logits": torch.randn(4, 3), "teacher_logits": torch.randn(4, 3)},
            {"temperature": 0.0},
            "functions[0].params.temperature",
            "> 0",
        ),
        ("multi_margin", L34, {"p": 3}, "functions[0].params.p", r"\[1, 2\]"),
        (
            "multi_margin",
            {"logits": torch.randn(4), "labels": torch.tensor([0, 1, 2, 0])},
            {},
            "tensors.logits",
            r"expected shape \[N, K\]",
        ),
        (
            "multiclass_hinge",
            {"logits": torch.randn(4, 1), "labels": torch.zeros(4, dtype=torch.int64)},
            {},
            "tensors.logits",
            "at least 2 classes",
        ),
        ("multiclass_hinge", {"logits": torch.randn(4, 3), "labels": torch.tensor([0.5, 1, 2, 0])}, {}, "tensors.labels", "non-integer"),
        ("focal", L34, {"alpha": [0.1, 0.2]}, "functions[0].params.alpha", "expected a scalar or 3 per-class values"),
        ("focal", L34, {"gamma": -1.0}, "functions[0].params.gamma", ">= 0"),
        ("focal", L34, {"alpha": -0.5}, "functions[0].params.alpha", ">= 0"),
        (
            "adaptive_label_smoothing",
            {"logits": torch.randn(4, 1), "labels": torch.zeros(4, dtype=torch.int64)},
            {},
            "tensors.logits",
            "at least 2 classes",
        ),
        ("adaptive_label_smoothing", L34, {"base_smoothing": 1.5}, "functions[0].params.base_smoothing", r"\[0, 1\]"),
        ("z_loss", {"logits": torch.randint(0, 3, (4, 3))}, {}, "tensors.logits", "floating-point"),
        ("z_loss", {"logits": torch.randn(4, 3), "weights": torch.rand(5)}, {}, "tensors.weights", "prefix"),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field
