"""Classification metrics against scikit-learn, torch and float64 formulas; exact merging; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import Accumulator, InvalidInput, StateLimitExceeded, evaluate


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    return out[name], [d.code for d in out.diagnostics]


def value(name, tensors, **params):
    return run(name, tensors, **params)[0].value


def multiclass(n=257, k=5, dtype=torch.float64, extra=(), scale=2.0):
    z = (torch.randn((n, k, *extra), dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, k, (n, *extra))
    return z, y


def binary(n=257, dtype=torch.float64):
    z = (torch.randn(n, dtype=torch.float64) * 2).to(dtype)
    t = (torch.rand(n) < 0.4).to(torch.float32)
    return z, t


def flat(z, y):
    """Class-last rows [M, K] and labels [M] of torch-layout logits [N, K, d...]."""
    return z.double().movedim(1, -1).reshape(-1, z.shape[1]).numpy(), y.reshape(-1).numpy()


def softmax(z):
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), 1).numpy()


# -- accuracy and top-k ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (257, 3), (6, 4, 5)])
def test_accuracy_matches_sklearn(dtype, shape):
    z, y = multiclass(shape[0], shape[1], dtype, shape[2:])
    rows, labels = flat(z, y)
    assert_close(value("accuracy", {"logits": z, "labels": y}), skm.accuracy_score(labels, rows.argmax(1)), rtol=1e-12)


def test_accuracy_ignore_index_and_weights():
    z, y = multiclass(100, 4)
    y[::3] = 9
    w = torch.rand(100, dtype=torch.float64)
    keep = (y != 9).numpy()
    ref = skm.accuracy_score(y.numpy()[keep], z.argmax(1).numpy()[keep], sample_weight=w.numpy()[keep])
    r, _ = run("accuracy", {"logits": z, "labels": y, "weights": w}, ignore_index=9)
    assert_close(r.value, ref, rtol=1e-12)
    assert r.denominator_kind == "weights"
    assert_close(r.denominator, w.numpy()[keep].sum(), rtol=1e-12)


def test_accuracy_all_ignored_is_nan():
    z, _ = multiclass(8, 3)
    r, codes = run("accuracy", {"logits": z, "labels": torch.full((8,), -100)})
    assert math.isnan(r.value) and r.denominator == 0 and "all_ignored" in codes


@pytest.mark.parametrize("threshold", [0.0, 1.5, -2.0])
@pytest.mark.parametrize("kind", ["logits", "probs", "log_probs"])
def test_binary_accuracy_threshold_and_input_kinds(threshold, kind):
    z, t = binary()
    z = z[(z - threshold).abs() > 1e-6]  # no score on the threshold itself
    t = t[: z.numel()]
    scores = {"logits": z, "probs": torch.sigmoid(z), "log_probs": F.logsigmoid(z)}[kind]
    ref = skm.accuracy_score(t.numpy(), (z > threshold).numpy().astype(float))
    assert_close(value("accuracy", {"logits": scores, "targets": t}, threshold=threshold, input_kind=kind), ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_accuracy_matches_sklearn(dtype, k):
    # Distinct scores per row (exact in every dtype): sklearn breaks ties the other way.
    z = (torch.argsort(torch.rand(257, 7), dim=1).to(torch.float64) * 0.75 - 2).to(dtype)
    y = torch.randint(0, 7, (257,))
    ref = skm.top_k_accuracy_score(y.numpy(), z.double().numpy(), k=k, labels=np.arange(7))
    assert_close(value("top_k_accuracy", {"logits": z, "labels": y}, k=k), ref, rtol=1e-12)


def test_top_k_accuracy_spatial_ignore_and_large_k():
    z, y = multiclass(5, 6, extra=(3, 2))
    y[0] = -100
    rows, labels = flat(z, y)
    keep = labels != -100
    ref = skm.top_k_accuracy_score(labels[keep], rows[keep], k=3, labels=np.arange(6))
    assert_close(value("top_k_accuracy", {"logits": z, "labels": y}, k=3), ref, rtol=1e-12)
    assert value("top_k_accuracy", {"logits": z, "labels": y}, k=6) == 1.0
    assert value("top_k_accuracy", {"logits": z, "labels": y}, k=50) == 1.0


def test_top_k_ties_go_to_the_lower_class_as_argmax():
    z = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0], [5.0, 5.0, -1.0]])
    y = torch.tensor([2, 2, 1])
    # ranks of the label: 2 (two lower-index ties ahead), 1, 1
    assert value("top_k_accuracy", {"logits": z, "labels": y}, k=1) == 0.0
    assert_close(value("top_k_accuracy", {"logits": z, "labels": y}, k=2), 2 / 3, rtol=1e-12)
    assert value("top_k_accuracy", {"logits": z, "labels": y}, k=3) == 1.0
    assert value("accuracy", {"logits": z, "labels": y}) == value("top_k_accuracy", {"logits": z, "labels": y}, k=1)


# -- precision / recall / f1 / confusion matrix --------------------------------------------------
def forced(pred, k):
    """Logits whose argmax is ``pred``."""
    z = torch.randn(len(pred), k, dtype=torch.float64)
    z[torch.arange(len(pred)), torch.as_tensor(pred)] = 10.0
    return z


# Class 4 is predicted but never true; class 3 is true but never predicted; class 5 appears in neither.
PRED = [0, 1, 2, 4, 0, 1, 1, 2, 4, 0, 2, 2]
TRUE = [0, 1, 2, 3, 1, 1, 0, 2, 3, 0, 2, 1]


@pytest.mark.parametrize("which", ["precision", "recall", "f1"])
@pytest.mark.parametrize("average", ["macro", "micro", "weighted", "none"])
@pytest.mark.parametrize("zero_division", [0, 1, "nan"])
def test_prf_matches_sklearn(which, average, zero_division):
    z, y = forced(PRED, 6), torch.tensor(TRUE)
    zd = np.nan if zero_division == "nan" else zero_division
    labels = np.arange(6) if average == "none" else None
    p, r, f, _ = skm.precision_recall_fscore_support(
        TRUE, PRED, average=None if average == "none" else average, zero_division=zd, labels=labels
    )
    ref = {"precision": p, "recall": r, "f1": f}[which]
    res, _ = run(which, {"logits": z, "labels": y}, average=average, zero_division=zero_division)
    got = res.tensors["value"] if average == "none" else res.value
    assert_close(got, ref, rtol=1e-12)
    if average == "none":
        assert_close(res.tensors["support"], np.bincount(TRUE, minlength=6), rtol=0)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_prf_random_weighted_and_spatial(average):
    z, y = multiclass(40, 5, extra=(3,))
    y[1] = -100
    w = torch.rand(40, dtype=torch.float64)
    rows, labels = flat(z, y)
    sw = w[:, None].expand(40, 3).reshape(-1).numpy()
    keep = labels != -100
    ref = skm.precision_recall_fscore_support(labels[keep], rows.argmax(1)[keep], average=average, sample_weight=sw[keep], zero_division=0)
    for which, expected in zip(["precision", "recall", "f1"], ref[:3], strict=True):
        assert_close(value(which, {"logits": z, "labels": y, "weights": w}, average=average), expected, rtol=1e-10, what=which)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_prf_binary_inputs(average):
    z, t = binary(101)
    ref = skm.precision_recall_fscore_support(t.numpy(), (z > 0.5).numpy().astype(float), average=average, zero_division=0)
    for which, expected in zip(["precision", "recall", "f1"], ref[:3], strict=True):
        assert_close(value(which, {"logits": z, "targets": t}, average=average, threshold=0.5), expected, rtol=1e-12, what=which)


def test_zero_division_accepts_numbers_and_strings_alike():
    spec = lambda zd: {"name": "precision", "params": {"zero_division": zd}}  # noqa: E731
    z, y = forced(PRED, 6), torch.tensor(TRUE)
    states = [evaluate({"logits": z, "labels": y}, [spec(zd)], return_state=True)["precision"].state for zd in (1, 1.0, "1")]
    assert len({s.params for s in states}) == 1
    nan = evaluate({"logits": z, "labels": y}, [spec(float("nan"))], return_state=True)["precision"]
    assert nan.state.params == evaluate({"logits": z, "labels": y}, [spec("nan")], return_state=True)["precision"].state.params


@pytest.mark.parametrize("weighted", [False, True])
def test_confusion_matrix_matches_sklearn(weighted):
    z, y = multiclass(60, 4, extra=(2,))
    w = torch.rand(60, dtype=torch.float64) if weighted else None
    rows, labels = flat(z, y)
    sw = None if w is None else w[:, None].expand(60, 2).reshape(-1).numpy()
    ref = skm.confusion_matrix(labels, rows.argmax(1), labels=np.arange(4), sample_weight=sw)
    tensors = {"logits": z, "labels": y} | ({"weights": w} if weighted else {})
    r, _ = run("confusion_matrix", tensors)
    assert_close(r.tensors["value"], ref, rtol=1e-12)
    assert r.denominator_kind == ("weights" if weighted else "samples")


def test_confusion_matrix_binary():
    z, t = binary(50)
    r, _ = run("confusion_matrix", {"logits": z, "targets": t}, threshold=0.3)
    assert_close(r.tensors["value"], skm.confusion_matrix(t.numpy(), (z > 0.3).numpy().astype(float), labels=[0, 1]), rtol=0)


# -- AUROC and average precision -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_binary_auroc_and_ap_match_sklearn(dtype, ties):
    z, t = binary(257, dtype)
    if ties:
        z = torch.round(z.double()).to(dtype)
    s = z.double().numpy()
    r, _ = run("auroc", {"logits": z, "targets": t})
    assert_close(r.value, skm.roc_auc_score(t.numpy(), s), rtol=1e-12)
    assert r.values["exact"] == 1.0
    assert_close(value("average_precision", {"logits": z, "targets": t}), skm.average_precision_score(t.numpy(), s), rtol=1e-12)


@pytest.mark.parametrize("kind", ["probs", "log_probs"])
def test_binary_input_kinds_rank_the_same(kind):
    z, t = binary(99)
    scores = torch.sigmoid(z) if kind == "probs" else F.logsigmoid(z)
    for name in ("auroc", "average_precision"):
        assert_close(value(name, {"logits": scores, "targets": t}, input_kind=kind), value(name, {"logits": z, "targets": t}), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multiclass_ovr_matches_sklearn(dtype):
    z, y = multiclass(200, 4, dtype, scale=1.0)
    p = softmax(z.double())
    r, _ = run("auroc", {"logits": z, "labels": y})
    assert_close(r.value, skm.roc_auc_score(y.numpy(), p, multi_class="ovr", average="macro"), rtol=1e-10)
    assert_close(r.tensors["per_class"], skm.roc_auc_score(y.numpy(), p, multi_class="ovr", average=None), rtol=1e-10)
    assert_close(
        value("average_precision", {"logits": z, "labels": y}), skm.average_precision_score(y.numpy(), p, average="macro"), rtol=1e-10
    )


def test_multiclass_probs_spatial_ignore_and_absent_class():
    z, y = multiclass(30, 5, extra=(2,), scale=1.0)
    y[y == 3] = 0  # class 3 absent: macro over the classes present
    y[:2] = -100
    rows, labels = flat(z, y)
    keep = labels != -100
    p, yk = softmax(rows)[keep], labels[keep]
    present = np.unique(yk)
    auc = np.mean([skm.roc_auc_score(yk == c, p[:, c]) for c in present])
    ap = skm.average_precision_score(np.searchsorted(present, yk), p[:, present], average="macro")
    probs = torch.softmax(z, 1)
    for scores, kind in ((z, "logits"), (probs, "probs")):
        r, _ = run("auroc", {"logits": scores, "labels": y}, input_kind=kind)
        assert_close(r.value, auc, rtol=1e-10)
        assert math.isnan(r.tensors["per_class"][3])
        assert_close(value("average_precision", {"logits": scores, "labels": y}, input_kind=kind), ap, rtol=1e-10)


def quantized(p, bins):
    return np.clip(np.ceil(p * bins) - 1, 0, bins - 1)


@pytest.mark.parametrize("bins", [2, 10, 1000])
def test_binned_equals_sklearn_on_quantized_scores(bins):
    z, t = binary(301)
    q = quantized(torch.sigmoid(z).numpy(), bins)
    r, codes = run("auroc", {"logits": z, "targets": t}, bins=bins)
    assert_close(r.value, skm.roc_auc_score(t.numpy(), q), rtol=1e-12)
    assert r.values["exact"] == 0.0 and "binned_estimate" in codes
    assert_close(value("average_precision", {"logits": z, "targets": t}, bins=bins), skm.average_precision_score(t.numpy(), q), rtol=1e-12)
    zm, y = multiclass(150, 3, scale=1.0)
    qm = quantized(softmax(zm), bins)
    assert_close(
        value("auroc", {"logits": zm, "labels": y}, bins=bins),
        np.mean([skm.roc_auc_score(y.numpy() == c, qm[:, c]) for c in range(3)]),
        rtol=1e-12,
    )
    ap = np.mean([skm.average_precision_score(y.numpy() == c, qm[:, c]) for c in range(3)])
    assert_close(value("average_precision", {"logits": zm, "labels": y}, bins=bins), ap, rtol=1e-12)


def test_binned_is_close_to_exact_with_fine_bins():
    z, t = binary(2000)
    assert abs(value("auroc", {"logits": z, "targets": t}, bins=10_000) - value("auroc", {"logits": z, "targets": t})) < 1e-3


def test_binary_threshold_is_not_rounded_to_float16():
    z = torch.tensor([0.1], dtype=torch.float16)  # 0.0999755859375 < 0.1
    assert value("accuracy", {"logits": z, "targets": torch.tensor([0.0])}, threshold=float(z[0]) - 1e-9) == 0.0
    assert value("accuracy", {"logits": z, "targets": torch.tensor([0.0])}, threshold=0.1) == 1.0


def test_bin_edges():
    p = torch.tensor([0.0, 0.5, 0.5000001, 1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # Two bins: (0, .5] with 0 -> bin 0 holds 0.0 and 0.5; bin 1 holds the rest: a perfect split.
    assert value("auroc", {"logits": p, "targets": t}, bins=2, input_kind="probs") == 1.0


@pytest.mark.parametrize("name", ["auroc", "average_precision"])
@pytest.mark.parametrize("bins", [None, 8])
def test_single_class_is_nan_with_a_diagnostic(name, bins):
    z, _ = binary(20)
    r, codes = run(name, {"logits": z, "targets": torch.ones(20)}, bins=bins)
    assert math.isnan(r.value) and "single_class_auroc" in codes
    zm, _ = multiclass(20, 3)
    r, codes = run(name, {"logits": zm, "labels": torch.full((20,), 2)}, bins=bins)
    assert math.isnan(r.value) and "single_class_auroc" in codes
    _, clean = run(name, {"logits": z, "targets": (torch.arange(20) % 2).float()}, bins=bins)
    assert "single_class_auroc" not in clean


@pytest.mark.parametrize("bins", [None, 8])
def test_nan_scores_give_nan(bins):
    z, t = binary(40)
    z[3] = math.nan
    zm, y = multiclass(40, 3)
    zm[5, 1] = math.nan
    for tensors in ({"logits": z, "targets": t}, {"logits": zm, "labels": y}):
        for name in ("auroc", "average_precision"):
            r, codes = run(name, tensors, bins=bins)
            assert math.isnan(r.value) and "nan_or_inf" in codes and r.denominator == 40


@pytest.mark.parametrize("name", ["auroc", "average_precision"])
@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_binned_merge_equals_unsplit_exactly(name, kind):
    tensors = (
        dict(zip(["logits", "targets"], binary(211), strict=True))
        if kind == "binary"
        else dict(zip(["logits", "labels"], multiclass(211, 4), strict=True))
    )
    spec = {"name": name, "params": {"bins": 64}}
    whole = evaluate(tensors, [spec])[name]
    acc = Accumulator([spec])
    for s in (slice(0, 50), slice(50, 51), slice(51, 211)):
        acc.add({k: v[s] for k, v in tensors.items()})
    merged = acc.result()[name]
    assert merged.values == whole.values
    for key, v in whole.tensors.items():
        np.testing.assert_array_equal(merged.tensors[key], v)


def test_exact_state_limit_is_enforced_by_the_evaluate_layer():
    z, t = binary(30)
    acc = Accumulator(["auroc"], exact_state_limit=25)
    acc.add({"logits": z[:20], "targets": t[:20]})
    with pytest.raises(StateLimitExceeded, match="bins=T"):
        acc.add({"logits": z[20:], "targets": t[20:]})
    binned = Accumulator([{"name": "auroc", "params": {"bins": 16}}], exact_state_limit=1)
    for s in (slice(0, 20), slice(20, 30)):
        binned.add({"logits": z[s], "targets": t[s]})


# -- log loss, brier, entropy --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_loss_matches_sklearn(dtype):
    z, y = multiclass(257, 5, dtype)
    w = torch.rand(257, dtype=torch.float64)
    ref = skm.log_loss(y.numpy(), softmax(z.double()), labels=np.arange(5), sample_weight=w.numpy())
    assert_close(value("log_loss", {"logits": z, "labels": y, "weights": w}), ref, **tol(dtype))
    zb, t = binary(257, dtype)
    ref_b = skm.log_loss(t.numpy(), torch.sigmoid(zb.double()).numpy(), labels=[0, 1])
    assert_close(value("log_loss", {"logits": zb, "targets": t}), ref_b, **tol(dtype))


def test_log_loss_equals_cross_entropy_and_is_not_clipped():
    z, y = multiclass(40, 4, extra=(3,))
    y[0, 0] = -100
    assert_close(value("log_loss", {"logits": z, "labels": y}), F.cross_entropy(z, y).item(), rtol=1e-12)
    z = torch.tensor([[-1e4, 1e4], [3.0, -3.0]], dtype=torch.float64)
    assert_close(
        value("log_loss", {"logits": z, "labels": torch.tensor([0, 0])}), (2e4 + F.softplus(torch.tensor(-6.0)).item()) / 2, rtol=1e-12
    )
    zb = torch.tensor([-1e4, 1e4, 30.0], dtype=torch.float64)
    tb = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    assert_close(value("log_loss", {"logits": zb, "targets": tb}), F.binary_cross_entropy_with_logits(zb, tb).item(), rtol=1e-12)


def test_log_loss_and_brier_input_kinds_and_soft_targets():
    z, y = multiclass(50, 4)
    ref = value("log_loss", {"logits": z, "labels": y})
    assert_close(value("log_loss", {"logits": torch.softmax(z, 1), "labels": y}, input_kind="probs"), ref, rtol=1e-10)
    assert_close(
        value("brier", {"logits": torch.log_softmax(z, 1), "labels": y}, input_kind="log_probs"),
        value("brier", {"logits": z, "labels": y}),
        rtol=1e-10,
    )
    zb, _ = binary(50)
    soft = torch.rand(50, dtype=torch.float64)
    ref = F.binary_cross_entropy_with_logits(zb, soft).item()
    for scores, kind in ((zb, "logits"), (torch.sigmoid(zb), "probs"), (F.logsigmoid(zb), "log_probs")):
        assert_close(value("log_loss", {"logits": scores, "targets": soft}, input_kind=kind), ref, rtol=1e-9)
    assert_close(value("brier", {"logits": zb, "targets": soft}), ((torch.sigmoid(zb) - soft) ** 2).mean().item(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_brier_matches_sklearn(dtype):
    zb, t = binary(257, dtype)
    ref = skm.brier_score_loss(t.numpy(), torch.sigmoid(zb.double()).numpy())
    assert_close(value("brier", {"logits": zb, "targets": t}), ref, **tol(dtype))
    z, y = multiclass(257, 4, dtype)
    w = torch.rand(257, dtype=torch.float64)
    ref = skm.brier_score_loss(y.numpy(), softmax(z.double()), labels=np.arange(4), scale_by_half=False, sample_weight=w.numpy())
    assert_close(value("brier", {"logits": z, "labels": y, "weights": w}), ref, **tol(dtype))


def test_brier_keeps_small_values_of_confident_rows():
    z = torch.tensor([[20.0, 0.0, 0.0]])
    p = torch.softmax(z.double(), 1)[0]
    ref = ((p - torch.tensor([1.0, 0, 0], dtype=torch.float64)) ** 2).sum().item()  # about 8e-18
    assert_close(value("brier", {"logits": z, "labels": torch.tensor([0])}), ref, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_matches_formula(dtype):
    z, _ = multiclass(257, 6, dtype, extra=(2,))
    lp = torch.log_softmax(z.double(), 1)
    ref = -(lp.exp() * lp).sum(1).mean().item()
    assert_close(value("entropy", {"logits": z}), ref, **tol(dtype))
    zb, _ = binary(257, dtype)
    p = torch.sigmoid(zb.double())
    ref = -(p * p.log() + (1 - p) * (1 - p).log()).mean().item()
    assert_close(value("entropy", {"logits": zb}), ref, **tol(dtype))


def test_entropy_of_one_hot_probabilities_is_zero():
    p = torch.eye(3, dtype=torch.float64)
    assert value("entropy", {"logits": p}, input_kind="probs") == 0.0
    assert value("entropy", {"logits": torch.tensor([1e4, -1e4])}) == 0.0


# -- perplexity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [True, False])
def test_perplexity_matches_exp_cross_entropy(dtype, shift):
    z = (torch.randn(3, 9, 11, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, 11, (3, 9))
    y[0, 4:] = -100
    zz, yy = (z[:, :-1], y[:, 1:]) if shift else (z, y)
    nll = F.cross_entropy(zz.double().reshape(-1, 11), yy.reshape(-1), ignore_index=-100).item()
    r, _ = run("perplexity", {"logits": z, "labels": y}, shift=shift)
    assert_close(r.values["nll"], nll, **tol(dtype))
    assert_close(r.value, math.exp(nll), **tol(dtype))
    assert r.denominator == int((yy != -100).sum()) and r.denominator_kind == "valid_tokens"


def test_perplexity_agrees_with_lm_cross_entropy():
    z, y = torch.randn(3, 9, 11), torch.randint(0, 11, (3, 9))
    y[1, 2:] = -100
    out = evaluate({"logits": z, "labels": y}, ["lm_cross_entropy", "perplexity"])
    assert out["perplexity"].value == out["lm_cross_entropy"].values["perplexity"]
    assert out["perplexity"].denominator == out["lm_cross_entropy"].denominator


def test_perplexity_shift_ignores_the_first_label_and_reports_all_ignored():
    z = torch.randn(2, 1, 5)
    r, codes = run("perplexity", {"logits": z, "labels": torch.tensor([[99], [99]])})
    assert math.isnan(r.value) and r.denominator == 0 and "all_ignored" in codes


# -- diagnostics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["accuracy", "precision", "recall", "f1"])
def test_class_imbalance(name):
    y = torch.zeros(300, dtype=torch.int64)
    y[:2] = 1
    z, _ = multiclass(300, 3)
    assert "class_imbalance" in run(name, {"logits": z, "labels": y})[1]
    assert "class_imbalance" in run(name, {"logits": z[:, 0], "targets": y.float()})[1]
    assert "class_imbalance" not in run(name, {"logits": z, "labels": torch.arange(300) % 3})[1]
    assert "class_imbalance" not in run(name, {"logits": z, "labels": torch.zeros(300, dtype=torch.int64)})[1]  # one class


# -- merging -------------------------------------------------------------------------------------
MULTICLASS_SPECS = [
    {"name": "accuracy"},
    {"name": "top_k_accuracy", "params": {"k": 2}},
    {"name": "precision", "params": {"average": "macro"}},
    {"name": "recall", "params": {"average": "weighted"}},
    {"name": "f1", "params": {"average": "none"}},
    {"name": "confusion_matrix"},
    {"name": "auroc"},
    {"name": "auroc", "params": {"bins": 32}},
    {"name": "average_precision"},
    {"name": "average_precision", "params": {"bins": 32}},
    {"name": "log_loss"},
    {"name": "brier"},
    {"name": "entropy"},
]


@pytest.mark.parametrize("spec", MULTICLASS_SPECS, ids=lambda s: s["name"] + str(s.get("params", "")))
def test_merge_is_exact_multiclass(spec):
    z, y = multiclass(157, 4, torch.float32)
    y[::7] = -100
    assert_merge_exact(_read_by(spec, {"logits": z, "labels": y}), spec, parts=5)


def _read_by(spec, tensors):
    """entropy reads no truth tensor, and a tensor no function reads is refused."""
    return {"logits": tensors["logits"]} if spec["name"] == "entropy" else tensors


@pytest.mark.parametrize(
    "spec", [s for s in MULTICLASS_SPECS if s["name"] != "top_k_accuracy"], ids=lambda s: s["name"] + str(s.get("params", ""))
)
def test_merge_is_exact_binary(spec):
    z, t = binary(157, torch.float32)
    assert_merge_exact(_read_by(spec, {"logits": z, "targets": t}), spec, parts=5)


def test_merge_is_exact_weighted_and_perplexity():
    z, y = multiclass(90, 3)
    w = torch.rand(90, dtype=torch.float64)
    for name in ("accuracy", "f1", "log_loss", "brier"):
        assert_merge_exact({"logits": z, "labels": y, "weights": w}, {"name": name}, parts=4)
    zt, yt = torch.randn(13, 6, 7), torch.randint(0, 7, (13, 6))
    yt[2, 3:] = -100
    assert_merge_exact({"logits": zt, "labels": yt}, {"name": "perplexity"}, parts=4)


# -- errors --------------------------------------------------------------------------------------
Z, Y, T = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        ("accuracy", {"logits": Z[:, 0], "targets": T, "labels": Y}, {}, "tensors.targets", "not both"),
        ("f1", {"logits": Z}, {}, "tensors.labels", "needs labels"),
        ("auroc", {"logits": Z, "targets": T}, {}, "tensors.logits", r"shape \[N\]"),
        ("accuracy", {"logits": Z[:, 0], "targets": torch.tensor([0.0, 0.5, 1.0, 1.0])}, {}, "tensors.targets", r"\{0, 1\}"),
        ("auroc", {"logits": Z[:, 0], "targets": T[:3]}, {}, "tensors.targets", "one target per logit"),
        ("precision", {"logits": Z, "labels": torch.tensor([0, 1, 3, 0])}, {}, "tensors.labels", "got 3 at flat index 2"),
        ("precision", {"logits": Z, "labels": Y}, {"zero_division": 2}, "functions[0].params.zero_division", "one of"),
        ("precision", {"logits": Z, "labels": Y}, {"average": "binary"}, "functions[0].params.average", "one of"),
        ("auroc", {"logits": Z, "labels": Y}, {"bins": 1}, "functions[0].params.bins", r"\[2, 100000\]"),
        ("top_k_accuracy", {"logits": Z, "labels": Y}, {"k": 0}, "functions[0].params.k", ">= 1"),
        ("top_k_accuracy", {"logits": Z[:, 0], "labels": Y}, {}, "tensors.logits", "role 'targets'"),
        ("accuracy", {"logits": Z[:, 0], "labels": Y}, {}, "tensors.logits", "role 'targets'"),
        ("log_loss", {"logits": Z + 1, "labels": Y}, {"input_kind": "probs"}, "tensors.logits", r"\[0, 1\]"),
        ("auroc", {"logits": Z[:, 0].abs(), "targets": T}, {"input_kind": "log_probs"}, "tensors.logits", "<= 0"),
        ("auroc", {"logits": torch.full((4, 3), 0.5), "labels": Y}, {"input_kind": "probs"}, "tensors.logits", "sum"),
        ("confusion_matrix", {"logits": torch.randn(2, 5000), "labels": torch.tensor([0, 1])}, {}, "tensors.logits", "over the limit"),
        ("perplexity", {"logits": Z, "labels": Y}, {}, "tensors.logits", r"\[B, T, V\]"),
        ("perplexity", {"logits": torch.randn(2, 3, 4), "labels": torch.zeros(2, 2)}, {}, "tensors.labels", r"expected shape \[2, 3\]"),
        ("perplexity", {"logits": torch.randn(2, 3, 4), "labels": torch.full((2, 3), 4)}, {}, "tensors.labels", r"\[0, 4\)"),
        ("entropy", {"logits": torch.randint(0, 3, (4, 3))}, {}, "tensors.logits", "floating-point"),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field


@pytest.mark.parametrize("poison", ["none", "nan", "neginf_row"])
def test_accuracy_without_weights_sums_the_same_state_as_with_unit_weights(poison: str) -> None:
    """All labels valid and every score finite: accuracy takes the unit-weight path; its state equals the weighted path's bit for bit."""
    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.standard_normal((300, 7)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 7, 300))
    if poison == "nan":
        z[5, 2] = math.nan
    elif poison == "neginf_row":
        z[9] = -math.inf
    plain = evaluate({"logits": z, "labels": y}, ["accuracy"], return_state=True).results["accuracy"]
    ones = evaluate({"logits": z, "labels": y, "weights": torch.ones(300, dtype=torch.float64)}, ["accuracy"], return_state=True)
    masked = evaluate({"logits": z, "labels": torch.where(torch.arange(300) == 0, -100, y)}, ["accuracy"], return_state=True)
    weighted = ones.results["accuracy"]
    assert plain.state is not None and weighted.state is not None
    for field in ("total", "weight", "count"):
        assert float(plain.state.fields[field]).hex() == float(weighted.state.fields[field]).hex(), field
    assert float(masked.results["accuracy"].state.fields["count"]) == 299  # an ignored label still leaves the sum
    assert (plain.value != plain.value) == (poison != "none")  # a NaN or all -inf row makes the accuracy NaN
