"""Binary and multi-label losses against torch, sklearn, monai and float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss
from sklearn.metrics import hinge_loss

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import InvalidInput, evaluate

SHAPES = [(1,), (257,), (5, 3), (2, 3, 4, 5)]
SEG_SHAPES = [(1, 1, 7), (2, 3, 4, 5), (3, 2, 2, 3, 4)]


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    r = out[name]
    return (r.tensors["value"] if params.get("reduction") == "none" else r.value), out


REDUCTIONS = ("mean", "sum", "none")


def run_reductions(name, tensors, **params):
    """{reduction: value} for all three reductions, from one evaluation (three aliased specs)."""
    specs = [{"name": name, "alias": r, "params": {**params, "reduction": r}} for r in REDUCTIONS]
    out = evaluate(tensors, specs)
    return {r: (out[r].tensors["value"] if r == "none" else out[r].value) for r in REDUCTIONS}


def batch(shape, dtype=torch.float64, soft=False, scale=3.0):
    z = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    y = torch.rand(shape, dtype=torch.float64) if soft else (torch.rand(shape) < 0.4).double()
    return z, y.to(dtype)


def reduce(per, reduction):
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


def channel_weight(values, ndim):
    w = torch.tensor(values, dtype=torch.float64)
    return w if ndim <= 2 else w.reshape((len(values),) + (1,) * (ndim - 2))


# -- bce_with_logits -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("soft", [False, True])
def test_bce_matches_torch(dtype, shape, soft):
    z, y = batch(shape, dtype, soft=soft)
    got = run_reductions("bce_with_logits", {"logits": z, "targets": y})
    for reduction in REDUCTIONS:
        ref = F.binary_cross_entropy_with_logits(z.double(), y.double(), reduction=reduction)
        assert_close(got[reduction], ref.numpy(), **tol(dtype), what=reduction)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scalar", [False, True])
def test_bce_pos_weight(shape, scalar):
    z, y = batch(shape, soft=True)
    channels = shape[1] if len(shape) > 1 else 1
    values = [0.5 + i for i in range(channels)]
    param = 2.5 if scalar else values
    got, _ = run("bce_with_logits", {"logits": z, "targets": y}, pos_weight=param)
    pw = torch.tensor(2.5, dtype=torch.float64) if scalar else channel_weight(values, len(shape))
    ref = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw)
    assert_close(got, ref.item(), rtol=1e-12)


def test_bce_row_weights_divide_by_their_sum():
    z, y = batch((20, 3))
    w = torch.rand(20, dtype=torch.float64)
    got, out = run("bce_with_logits", {"logits": z, "targets": y, "weights": w})
    per = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert_close(got, ((w[:, None] * per).sum() / (3 * w.sum())).item(), rtol=1e-12)
    assert out["bce_with_logits"].denominator == pytest.approx(3 * w.sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_extreme_logits_are_finite(dtype):
    z = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=dtype)
    got, _ = run("bce_with_logits", {"logits": z, "targets": y}, reduction="none")
    assert_close(got, [0.0, 0.0, 1e4, 1e4], rtol=1e-7)


# -- margin losses ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_hinge_matches_sklearn(dtype, weighted):
    z, y = batch((257,), dtype)
    y[:2] = torch.tensor([0.0, 1.0], dtype=dtype)  # sklearn's binary branch needs both classes present
    w = torch.rand(257, dtype=torch.float64) if weighted else None
    tensors = {"logits": z, "targets": y} | ({"weights": w} if weighted else {})
    got, _ = run("hinge", tensors)
    sw = None if w is None else w.numpy()
    decision = z.double().numpy()
    # sklearn reads {0, 1} and {−1, 1} labels alike.
    assert_close(got, hinge_loss(y.double().numpy(), decision, sample_weight=sw), **tol(dtype))
    assert_close(got, hinge_loss(2 * y.double().numpy() - 1, decision, sample_weight=sw), **tol(dtype))


def test_hinge_single_sample():
    got, _ = run("hinge", {"logits": torch.tensor([0.25]), "targets": torch.tensor([1.0])})
    assert_close(got, 0.75, rtol=1e-7)


@pytest.mark.parametrize("name", ["hinge", "squared_hinge"])
@pytest.mark.parametrize("margin", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_hinge_family_matches_formula(name, margin, shape):
    z, y = batch(shape)
    got = run_reductions(name, {"logits": z, "targets": y}, margin=margin)
    h = torch.clamp(margin - (2 * y - 1) * z, min=0)
    per = h if name == "hinge" else h * h
    for reduction in REDUCTIONS:
        assert_close(got[reduction], reduce(per, reduction).numpy(), rtol=1e-12, atol=1e-12, what=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_exponential_matches_float64(dtype, shape):
    z, y = batch(shape, dtype)
    got = run_reductions("exponential", {"logits": z, "targets": y})
    per = torch.exp(-(2 * y.double() - 1) * z.double())
    for reduction in REDUCTIONS:
        assert_close(got[reduction], reduce(per, reduction).numpy(), **tol(dtype), what=reduction)
    assert run("exponential", {"logits": z, "targets": y})[1].diagnostics == []


def test_exponential_overflow_is_inf_and_reported():
    z = torch.tensor([1e4, 800.0, 3.0], dtype=torch.float32)
    y = torch.tensor([1.0, 0.0, 1.0])
    per, out = run("exponential", {"logits": z, "targets": y}, reduction="none")
    assert per[0] == 0.0 and per[1] == math.inf
    assert_close(per[2], math.exp(-3.0), rtol=1e-12)
    assert [d.code for d in out.diagnostics] == ["overflow"]
    mean, _ = run("exponential", {"logits": z, "targets": y})
    assert mean == math.inf
    # exp(100) overflows float32 but not float64: finite, no diagnostic.
    finite, clean = run("exponential", {"logits": torch.tensor([100.0]), "targets": torch.tensor([0.0])})
    assert_close(finite, math.exp(100.0), rtol=1e-12)
    assert clean.diagnostics == []


# -- sigmoid_focal ---------------------------------------------------------------


def focal_ref(z, y, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss, written out (reduction='none')."""
    p = torch.sigmoid(z)
    ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sigmoid_focal_matches_torchvision_formula(dtype, shape):
    z, y = batch(shape, dtype, scale=2.0)
    got = run_reductions("sigmoid_focal", {"logits": z, "targets": y})
    per = focal_ref(z.double(), y.double(), 0.25, 2.0)
    for reduction in REDUCTIONS:
        assert_close(got[reduction], reduce(per, reduction).numpy(), **tol(dtype), what=reduction)


@pytest.mark.parametrize("alpha", [None, 0.0, 0.7, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_focal_params(alpha, gamma, soft):
    z, y = batch((40, 3), soft=soft)
    got, _ = run("sigmoid_focal", {"logits": z, "targets": y}, alpha=alpha, gamma=gamma)
    assert_close(got, focal_ref(z, y, alpha, gamma).mean().item(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_sigmoid_focal_equals_monai_focal_loss(alpha):
    z, y = batch((2, 3, 4, 5))
    got, _ = run("sigmoid_focal", {"logits": z, "targets": y}, alpha=alpha, gamma=2.0)
    ref = FocalLoss(gamma=2.0, alpha=alpha, use_softmax=False)(z, y)
    assert_close(got, ref.item(), **tol(torch.float32))  # monai computes in float32


def test_sigmoid_focal_extreme_logits():
    z = torch.tensor([1e4, -1e4, 1e4, -1e4])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got, _ = run("sigmoid_focal", {"logits": z, "targets": y}, reduction="none")
    assert_close(got, [0.0, 0.0, 0.75 * 1e4, 0.25 * 1e4], rtol=1e-7)


# -- dice family -----------------------------------------------------------------


def monai_none(value, shape):
    """monai's reduction='none' output [B, C, 1, ...] as [B, C]."""
    return value.reshape(shape[:2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SEG_SHAPES)
def test_dice_matches_monai(dtype, shape):
    z, y = batch(shape, dtype)
    got = run_reductions("dice", {"logits": z, "targets": y})
    for reduction in REDUCTIONS:
        ref = DiceLoss(sigmoid=True, reduction=reduction)(z.double(), y.double())
        if reduction == "none":
            ref = monai_none(ref, shape)
        assert_close(got[reduction], ref.numpy(), **tol(dtype), what=reduction)


@pytest.mark.parametrize("smooth", [0.0, 1e-5, 1.0])
@pytest.mark.parametrize("input_kind", ["logits", "probs"])
def test_dice_smooth_and_input_kind(smooth, input_kind):
    z, y = batch((2, 3, 4, 5), soft=True)
    x = z if input_kind == "logits" else torch.sigmoid(z)
    got, _ = run("dice", {"logits": x, "targets": y}, smooth=smooth, input_kind=input_kind)
    ref = DiceLoss(sigmoid=input_kind == "logits", smooth_nr=smooth, smooth_dr=smooth)(x, y)
    assert_close(got, ref.item(), rtol=1e-12)


def test_dice_empty_masks():
    z = torch.full((2, 2, 3, 3), -1e4)
    y = torch.zeros(2, 2, 3, 3)
    y[0, 0, 1, 1] = 1  # one non-empty mask
    got, out = run("dice", {"logits": z, "targets": y}, reduction="none")
    ref = monai_none(DiceLoss(sigmoid=True, reduction="none")(z.double(), y.double()), z.shape)
    assert_close(got, ref.numpy(), rtol=1e-6, atol=1e-7)
    assert_close(got[1], [0.0, 0.0], atol=1e-12)  # empty target, empty prediction: no loss
    assert out.diagnostics == []


def test_dice_sample_weights():
    z, y = batch((4, 3, 5, 5))
    w = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    got, _ = run("dice", {"logits": z, "targets": y, "weights": w})
    per = monai_none(DiceLoss(sigmoid=True, reduction="none")(z, y), z.shape)
    assert_close(got, ((w[:, None] * per).sum() / (3 * w.sum())).item(), rtol=1e-12)


@pytest.mark.parametrize("shape", SEG_SHAPES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0), (0.0, 1.0)])
def test_dice_bce_matches_monai(shape, weights):
    z, y = batch(shape)
    dw, bw = weights
    got, _ = run("dice_bce", {"logits": z, "targets": y}, dice_weight=dw, bce_weight=bw)
    dice = DiceLoss(sigmoid=True)(z, y)
    bce = F.binary_cross_entropy_with_logits(z, y)
    assert_close(got, (dw * dice + bw * bce).item(), rtol=1e-12)
    if shape[1] == 1:  # monai's DiceCELoss takes the BCE branch only for one channel (softmax CE otherwise)
        ref = DiceCELoss(sigmoid=True, lambda_dice=dw, lambda_ce=bw)(z, y)
        assert_close(got, ref.item(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dice_bce_dtypes_and_reductions(dtype):
    z, y = batch((3, 1, 6, 7), dtype)
    got = run_reductions("dice_bce", {"logits": z, "targets": y})
    zd, yd = z.double(), y.double()
    per = monai_none(DiceLoss(sigmoid=True, reduction="none")(zd, yd), z.shape)
    per = per + F.binary_cross_entropy_with_logits(zd, yd, reduction="none").mean(dim=(2, 3))
    for reduction in REDUCTIONS:
        assert_close(got[reduction], reduce(per, reduction).numpy(), **tol(dtype), what=reduction)
    assert_close(got["mean"], DiceCELoss(sigmoid=True)(zd, yd).item(), **tol(dtype))


def test_dice_bce_probs():
    z, y = batch((2, 3, 4, 4), soft=True)
    p = torch.sigmoid(z)
    got, out = run("dice_bce", {"logits": p, "targets": y}, input_kind="probs")
    ref = DiceLoss(sigmoid=False)(p, y) + F.binary_cross_entropy(p, y)
    assert_close(got, ref.item(), rtol=1e-10)
    assert out.diagnostics == []


def test_dice_bce_certain_wrong_probability_is_inf_and_reported():
    p = torch.tensor([[[0.0, 0.5, 1.0]]], dtype=torch.float64)
    y = torch.tensor([[[1.0, 1.0, 1.0]]], dtype=torch.float64)
    got, out = run("dice_bce", {"logits": p, "targets": y}, input_kind="probs")
    assert got == math.inf
    assert "overflow" in [d.code for d in out.diagnostics]


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.3, 0.7), (1.0, 0.0)])
@pytest.mark.parametrize("shape", SEG_SHAPES)
def test_tversky_matches_monai(alpha, beta, shape):
    z, y = batch(shape)
    got = run_reductions("tversky", {"logits": z, "targets": y}, alpha=alpha, beta=beta)
    for reduction in REDUCTIONS:
        ref = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, reduction=reduction)(z, y)
        assert_close(got[reduction], ref.numpy(), rtol=1e-12, atol=1e-14, what=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_kind", ["logits", "probs"])
def test_tversky_dtypes_and_probs(dtype, input_kind):
    z, y = batch((2, 3, 8, 8), dtype)
    x = z if input_kind == "logits" else torch.sigmoid(z.float()).to(dtype)
    got, _ = run("tversky", {"logits": x, "targets": y}, alpha=0.2, beta=0.8, smooth=0.5, input_kind=input_kind)
    ref = TverskyLoss(sigmoid=input_kind == "logits", alpha=0.2, beta=0.8, smooth_nr=0.5, smooth_dr=0.5)(x.double(), y.double())
    assert_close(got, ref.item(), **tol(dtype))


def test_tversky_with_equal_weights_is_dice():
    z, y = batch((2, 2, 5, 5))
    dice, _ = run("dice", {"logits": z, "targets": y})
    tversky, _ = run("tversky", {"logits": z, "targets": y}, alpha=0.5, beta=0.5)
    # same loss up to smoothing: (TP + s)/(TP + ½FP + ½FN + s) vs (2TP + s)/(2TP + FP + FN + s)
    assert_close(tversky, dice, rtol=1e-5)


# -- merging and errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, shape",
    [
        ("bce_with_logits", {"pos_weight": [1.0, 2.0, 0.5]}, (101, 3)),
        ("hinge", {"margin": 0.5}, (101,)),
        ("squared_hinge", {}, (101, 3)),
        ("exponential", {}, (101, 3)),
        ("sigmoid_focal", {"alpha": None, "gamma": 1.5}, (101, 3, 2)),
        ("dice", {}, (23, 3, 4, 4)),
        ("dice_bce", {"dice_weight": 0.5}, (23, 3, 4, 4)),
        ("tversky", {"alpha": 0.3, "beta": 0.7}, (23, 3, 4, 4)),
    ],
)
def test_merge_is_exact(name, params, shape):
    z, y = batch(shape, torch.float32)
    w = torch.rand(shape[0])
    assert_merge_exact({"logits": z, "targets": y, "weights": w}, {"name": name, "params": params}, parts=5)


Z, Y = torch.randn(4, 3), (torch.rand(4, 3) < 0.5).float()
SEG_Z, SEG_Y = torch.randn(2, 3, 4), (torch.rand(2, 3, 4) < 0.5).float()
SOFT = torch.full((4, 3), 0.3)


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        ("bce_with_logits", {"logits": Z, "targets": Y[:, :2]}, {}, "tensors.targets", r"expected the shape of logits \[4, 3\]"),
        ("bce_with_logits", {"logits": Z, "targets": Y + 0.5}, {}, "tensors.targets", r"expected targets in \[0, 1\]"),
        ("bce_with_logits", {"logits": Z.long(), "targets": Y}, {}, "tensors.logits", "floating-point"),
        ("bce_with_logits", {"logits": Z, "targets": Y}, {"pos_weight": [1.0, 2.0]}, "functions[0].params.pos_weight", "expected 3 values"),
        (
            "bce_with_logits",
            {"logits": Z[:, 0], "targets": Y[:, 0]},
            {"pos_weight": [1.0, 2.0]},
            "functions[0].params.pos_weight",
            "expected 1 values",
        ),
        ("bce_with_logits", {"logits": Z, "targets": Y}, {"pos_weight": -1.0}, "functions[0].params.pos_weight", ">= 0"),
        ("bce_with_logits", {"logits": torch.tensor(1.0), "targets": torch.tensor(1.0)}, {}, "tensors.logits", "expected shape"),
        ("hinge", {"logits": Z, "targets": SOFT}, {}, "tensors.targets", r"hard targets in \{0, 1\}.*got 0.3000"),
        ("hinge", {"logits": Z, "targets": 2 * Y - 1}, {}, "tensors.targets", r"send \(label \+ 1\) / 2"),
        ("squared_hinge", {"logits": Z, "targets": SOFT}, {}, "tensors.targets", "hard targets"),
        ("exponential", {"logits": Z, "targets": SOFT}, {}, "tensors.targets", "hard targets"),
        ("sigmoid_focal", {"logits": Z, "targets": Y}, {"alpha": 1.5}, "functions[0].params.alpha", r"\[0, 1\]"),
        ("sigmoid_focal", {"logits": Z, "targets": Y}, {"gamma": -1.0}, "functions[0].params.gamma", ">= 0"),
        ("dice", {"logits": Z, "targets": Y}, {}, "tensors.logits", r"\[B, C, \*spatial\]"),
        ("dice", {"logits": SEG_Z, "targets": SEG_Y}, {"input_kind": "probs"}, "tensors.logits", r"probabilities in \[0, 1\]"),
        ("dice", {"logits": SEG_Z, "targets": SEG_Y}, {"input_kind": "log_probs"}, "functions[0].params.input_kind", "one of"),
        ("dice", {"logits": SEG_Z, "targets": SEG_Y}, {"smooth": -1.0}, "functions[0].params.smooth", ">= 0"),
        ("dice", {"logits": SEG_Z, "targets": SEG_Y, "weights": torch.ones(3)}, {}, "tensors.weights", "prefix"),
        ("dice_bce", {"logits": SEG_Z, "targets": SEG_Y}, {"bce_weight": -0.5}, "functions[0].params.bce_weight", ">= 0"),
        ("tversky", {"logits": SEG_Z, "targets": SEG_Y[:, :2]}, {}, "tensors.targets", "expected the shape of logits"),
        ("tversky", {"logits": SEG_Z, "targets": SEG_Y}, {"alpha": -0.1}, "functions[0].params.alpha", ">= 0"),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field


def test_integer_and_bool_targets_are_accepted():
    z = torch.randn(10, dtype=torch.float64)
    y = torch.rand(10) < 0.5
    for t in (y, y.long()):
        got, _ = run("hinge", {"logits": z, "targets": t})
        assert_close(got, torch.clamp(1 - (2 * y.double() - 1) * z, min=0).mean().item(), rtol=1e-12)
    assert np.isfinite(run("bce_with_logits", {"logits": z, "targets": y.to(torch.uint8)})[0])
