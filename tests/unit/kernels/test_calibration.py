"""Calibration functions against uncertainty-calibration, sklearn's calibration_curve, scipy and float64 formulas.

uncertainty-calibration bins equal-width with edges i/B and np.searchsorted
(side left): a confidence equal to an edge goes to the bin below, 0 to bin 0
and 1.0 to the last bin, the service's own rule.  Random test inputs stay off
the edges anyway, where sklearn's linspace edges may differ by an ulp; the
edge rule itself is tested directly on bin_index.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from calibration import utils as uc
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve

from helpers import DTYPES, assert_close, assert_merge_exact, random_splits, split_tensors, tol
from lossd.kernels import Accumulator, InvalidInput, evaluate
from lossd.kernels.calibration import ece as ece_module
from lossd.kernels.calibration import temperature as temperature_module
from lossd.kernels.calibration.bins import ADAPTIVE_HISTOGRAM_BINS, bin_edges, bin_index, bin_sums

BINNED = ("ece", "mce", "debiased_ece", "adaptive_ece", "reliability_diagram")


def run(tensors, name, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    return out[name], out


def data(n, k, *, scale=2.0, dtype=torch.float64, seed=0):
    """Logits and labels drawn from a softened softmax of them: roughly (not exactly) calibrated."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(torch.softmax(z / 1.5, 1), 1, generator=g).squeeze(1) if k > 1 else torch.zeros(n, dtype=torch.int64)
    return z.to(dtype), y


def top_label(z, y):
    """Float64 top-1 confidence and correctness of (the same low-precision values of) z."""
    p = torch.softmax(z.double(), 1).numpy()
    return p.max(1), (p.argmax(1) == y.numpy()).astype(np.float64), p


def reference_bins(conf, correct, n_bins):
    """Per-bin (n, Σ conf, Σ correct) with uncertainty-calibration's edges and searchsorted."""
    idx = np.searchsorted(uc.get_equal_prob_bins(conf, n_bins), conf)
    n = np.bincount(idx, minlength=n_bins).astype(np.float64)
    return n, np.bincount(idx, conf, n_bins), np.bincount(idx, correct, n_bins)


def reference_ece(conf, correct, n_bins, norm):
    n, sc, sa = reference_bins(conf, correct, n_bins)
    nz = n > 0
    gap = np.abs(sa[nz] / n[nz] - sc[nz] / n[nz])
    if norm == "l1":
        return float((n[nz] / n.sum() * gap).sum())
    if norm == "l2":
        return float(np.sqrt((n[nz] / n.sum() * gap**2).sum()))
    return float(gap.max())


# -- the bin rule ---------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 15, 49, 1000])
def test_bin_rule_at_exact_edges(n_bins):
    one_b = 1.0 / n_bins
    conf = torch.tensor([0.0, one_b, 0.5, 1.0], dtype=torch.float64)
    idx = bin_index(conf, n_bins).tolist()
    assert idx[0] == 0 and idx[1] == 0 and idx[3] == n_bins - 1
    assert idx[2] == math.ceil(0.5 * n_bins) - 1  # 0.5 = b/B goes to bin b−1 when B is even
    # Every float64 edge b/B belongs to the bin below it; the next float up to the bin above.
    edges = bin_edges(n_bins)
    b = torch.arange(1, n_bins + 1)
    assert torch.equal(bin_index(edges[1:], n_bins), b - 1)
    above = torch.nextafter(edges[1:-1], torch.tensor(2.0, dtype=torch.float64))
    assert torch.equal(bin_index(above, n_bins), b[:-1])
    assert torch.equal(bin_index(torch.tensor([1e-300, 5e-324], dtype=torch.float64), n_bins), torch.zeros(2, dtype=torch.int64))


def test_bin_rule_where_the_product_rounds_across_an_edge():
    # 0.28·25 = 7.000000000000001 in float64: a plain ceil would put the edge 0.28 = 7/25 in bin 7.
    assert float(torch.tensor(0.28, dtype=torch.float64) * 25) > 7
    assert bin_index(torch.tensor([0.28, 0.56, 0.3], dtype=torch.float64), 25).tolist() == [6, 13, 7]
    edges = uc.get_equal_prob_bins(None, 25)
    assert bin_index(torch.tensor([0.28, 0.56], dtype=torch.float64), 25).tolist() == [int(np.searchsorted(edges, v)) for v in (0.28, 0.56)]


def test_bin_rule_matches_uncertainty_calibration_on_many_edges():
    for n_bins in range(1, 120):
        edges = np.array(uc.get_equal_prob_bins(None, n_bins))
        probe = np.concatenate([[0.0], edges, np.nextafter(edges, 2.0)[:-1], np.nextafter(edges, -1.0)])
        ours = bin_index(torch.from_numpy(probe), n_bins).numpy()
        assert np.array_equal(ours, np.searchsorted(edges, probe)), n_bins


def test_bin_sums_layout():
    conf = torch.tensor([0.0, 0.05, 0.5, 0.51, 1.0], dtype=torch.float64)
    correct = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    s = bin_sums(conf, correct, 2)
    assert s.dtype == torch.float64 and s.shape == (2, 3)
    assert_close(s, [[3, 0.55, 2], [2, 1.51, 1]], rtol=1e-15)


# -- ece and mce ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (257, 3), (64, 7)])
def test_ece_matches_uncertainty_calibration(dtype, shape):
    z, y = data(*shape, dtype=dtype)
    _, _, probs = top_label(z, y)
    got, _ = run({"logits": z, "labels": y}, "ece")
    assert_close(got.value, uc.get_ece(probs, y.numpy(), num_bins=15), **tol(dtype))
    assert got.denominator == shape[0]


@pytest.mark.parametrize("n_bins", [1, 7, 15, 100])
def test_ece_l2_matches_lower_bound_scaling_ce(n_bins):
    z, y = data(300, 4)
    _, _, probs = top_label(z, y)
    got, _ = run({"logits": z, "labels": y}, "ece", n_bins=n_bins, norm="l2")
    ref = uc.lower_bound_scaling_ce(
        probs, y.numpy(), p=2, debias=False, num_bins=n_bins, binning_scheme=uc.get_equal_prob_bins, mode="top-label"
    )
    assert_close(got.value, ref, rtol=1e-9)
    l1, _ = run({"logits": z, "labels": y}, "ece", n_bins=n_bins)
    assert_close(l1.value, uc.get_ece(probs, y.numpy(), num_bins=n_bins), rtol=1e-9)


@pytest.mark.parametrize("n_bins", [3, 15])
def test_max_norm_and_mce(n_bins):
    z, y = data(257, 5)
    conf, correct, _ = top_label(z, y)
    ref = reference_ece(conf, correct, n_bins, "max")
    assert_close(run({"logits": z, "labels": y}, "ece", n_bins=n_bins, norm="max")[0].value, ref, rtol=1e-12)
    assert_close(run({"logits": z, "labels": y}, "mce", n_bins=n_bins)[0].value, ref, rtol=1e-12)


def test_positive_class_binary_logits_and_two_column_logits():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(200, generator=g, dtype=torch.float64) * 2
    t = (torch.rand(200, generator=g, dtype=torch.float64) < torch.sigmoid(z)).to(torch.float64)
    p = torch.sigmoid(z).numpy()
    ref = uc.get_ece(p, t.numpy().astype(np.int64), num_bins=10)
    one, _ = run({"logits": z, "targets": t}, "ece", scope="positive_class", n_bins=10)
    two, _ = run({"logits": torch.stack([torch.zeros_like(z), z], 1), "labels": t.long()}, "ece", scope="positive_class", n_bins=10)
    assert_close(one.value, ref, rtol=1e-9)
    assert_close(two.value, ref, rtol=1e-9)
    # Top-label on [N] scores is the top-label of the equivalent [N, 2] softmax.
    for norm in ("l1", "l2", "max"):
        a = run({"logits": z, "targets": t}, "ece", norm=norm)[0].value
        b = run({"logits": torch.stack([torch.zeros_like(z), z], 1), "labels": t.long()}, "ece", norm=norm)[0].value
        assert_close(a, b, rtol=1e-12)
    conf = np.maximum(p, 1 - p)
    correct = ((p > 0.5) == (t.numpy() == 1)).astype(np.float64)
    assert_close(run({"logits": z, "targets": t}, "ece")[0].value, reference_ece(conf, correct, 15, "l1"), rtol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_low_precision(dtype):
    z = (torch.randn(257, dtype=torch.float64) * 3).to(dtype)
    t = (torch.rand(257) < 0.4).to(dtype)
    p = torch.sigmoid(z.double()).numpy()
    got, _ = run({"logits": z, "targets": t}, "ece", scope="positive_class")
    assert_close(got.value, uc.get_ece(p, t.float().numpy().astype(np.int64)), rtol=1e-9)


def test_classwise_matches_marginal_mode_and_formula():
    z, y = data(257, 4)
    _, _, probs = top_label(z, y)
    got, _ = run({"logits": z, "labels": y}, "ece", scope="classwise")
    assert_close(got.value, uc.get_ece(probs, y.numpy(), num_bins=15, mode="marginal"), rtol=1e-9)
    per_class = [reference_ece(probs[:, k], (y.numpy() == k).astype(np.float64), 15, "l1") for k in range(4)]
    assert_close(got.tensors["per_class"], per_class, rtol=1e-9)
    for norm in ("l2", "max"):
        ref = np.mean([reference_ece(probs[:, k], (y.numpy() == k).astype(np.float64), 15, norm) for k in range(4)])
        assert_close(run({"logits": z, "labels": y}, "ece", scope="classwise", norm=norm)[0].value, ref, rtol=1e-9)
    # Binary [N] scores are two classes.
    zb = torch.randn(50, dtype=torch.float64)
    tb = (torch.rand(50) < 0.5).double()
    two = torch.stack([torch.zeros_like(zb), zb], 1)
    assert_close(
        run({"logits": zb, "targets": tb}, "ece", scope="classwise")[0].value,
        run({"logits": two, "labels": tb.long()}, "ece", scope="classwise")[0].value,
        rtol=1e-12,
    )


def test_spatial_scores_are_rows():
    z = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6, 4, 5))
    y[0, 0] = -100
    flat_z = z.movedim(1, -1).reshape(-1, 3)
    flat_y = y.reshape(-1)
    keep = flat_y != -100
    for params in ({}, {"scope": "classwise"}, {"norm": "l2"}):
        got = run({"logits": z, "labels": y}, "ece", **params)[0]
        ref = run({"logits": flat_z[keep], "labels": flat_y[keep]}, "ece", **params)[0]
        assert_close(got.value, ref.value, rtol=1e-12)
        assert got.denominator == int(keep.sum())
    t_got = run({"logits": z, "labels": y}, "temperature")[0]
    t_ref = run({"logits": flat_z[keep], "labels": flat_y[keep]}, "temperature")[0]
    assert_close(t_got.values["value"], t_ref.values["value"], rtol=1e-9)


def test_input_kinds_agree():
    z, y = data(120, 5)
    lp = torch.log_softmax(z, 1)
    for name in BINNED + ("temperature",):
        ref = run({"logits": z, "labels": y}, name)[0]
        for scores, kind in ((lp, "log_probs"), (lp.exp(), "probs")):
            got = run({"logits": scores, "labels": y}, name, input_kind=kind)[0]
            for key, value in ref.values.items():
                assert_close(got.values[key], value, rtol=1e-7, atol=1e-10, what=f"{name}.{key} ({kind})")
    zb = torch.randn(80, dtype=torch.float64) * 2
    tb = (torch.rand(80) < 0.5).double()
    pb = torch.sigmoid(zb)
    for name in ("ece", "temperature"):
        ref = (
            run({"logits": zb, "targets": tb}, name, scope="positive_class") if name == "ece" else run({"logits": zb, "targets": tb}, name)
        )
        for scores, kind in ((pb.log(), "log_probs"), (pb, "probs")):
            params = {"input_kind": kind, **({"scope": "positive_class"} if name == "ece" else {})}
            got = run({"logits": scores, "targets": tb}, name, **params)[0]
            assert_close(got.values["value"], ref[0].values["value"], rtol=1e-7, what=f"{name} ({kind})")


def test_ignore_index():
    z, y = data(40, 3)
    y2 = y.clone()
    y2[::3] = -100
    keep = y2 != -100
    for name in BINNED:
        got = run({"logits": z, "labels": y2}, name)[0]
        ref = run({"logits": z[keep], "labels": y[keep]}, name)[0]
        assert_close(got.value, ref.value, rtol=1e-12, what=name)
    assert run({"logits": z, "labels": torch.where(keep, y, 7)}, "ece", ignore_index=7)[0].denominator == int(keep.sum())


# -- edges: confidences 0 and 1, empty bins, single class, nothing left -------


def test_confidence_exactly_one_and_zero():
    # Logits ±1e4: top-1 confidence is exactly 1.0 and lands in the last bin.
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4]], dtype=torch.float32)
    y = torch.tensor([0, 0, 2])
    rd, _ = run({"logits": z, "labels": y}, "reliability_diagram", n_bins=10)
    assert rd.tensors["count"].tolist() == [0] * 9 + [3]
    assert_close(rd.tensors["mean_confidence"][-1], 1.0, rtol=0)
    assert_close(rd.values["over_confidence"], 1 / 3, rtol=1e-12)
    assert_close(run({"logits": z, "labels": y}, "ece")[0].value, 1 / 3, rtol=1e-12)
    # p(y=1) exactly 0 goes to bin 0, exactly 1 to the last bin.
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.1, 0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    rd, _ = run({"logits": p, "targets": t}, "reliability_diagram", n_bins=10, scope="positive_class", input_kind="probs")
    assert rd.tensors["count"].tolist() == [3, 0, 0, 0, 1, 0, 0, 0, 0, 2]  # 0.1 = 1/10 in bin 0, 0.5 in bin 4
    ref = uc.get_ece(p.numpy(), t.numpy().astype(np.int64), num_bins=10)
    assert_close(run({"logits": p, "targets": t}, "ece", n_bins=10, scope="positive_class", input_kind="probs")[0].value, ref, rtol=1e-12)


def test_empty_bins_are_nan_in_the_diagram_and_skipped_in_ece():
    conf = torch.tensor([0.12, 0.13, 0.95, 0.97], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    rd, _ = run({"logits": conf, "targets": t}, "reliability_diagram", n_bins=5, scope="positive_class", input_kind="probs")
    assert rd.tensors["count"].tolist() == [2, 0, 0, 0, 2]
    assert np.isnan(rd.tensors["accuracy"][1:4]).all() and np.isnan(rd.tensors["mean_confidence"][1:4]).all()
    assert_close(rd.tensors["accuracy"][[0, 4]], [0.5, 1.0], rtol=0)
    assert_close(rd.tensors["bin_edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-15)
    assert_close(rd.values["under_confidence"], (2 * (0.5 - 0.125) + 2 * (1 - 0.96)) / 4, rtol=1e-12)
    assert rd.values["over_confidence"] == 0
    ece = run({"logits": conf, "targets": t}, "ece", n_bins=5, scope="positive_class", input_kind="probs")[0]
    assert_close(ece.value, rd.value, rtol=1e-15)


def test_single_class_inputs():
    z = torch.randn(30, 1, dtype=torch.float64)
    y = torch.zeros(30, dtype=torch.int64)
    for name in ("ece", "mce", "debiased_ece", "adaptive_ece"):
        assert run({"logits": z, "labels": y}, name)[0].value == 0.0, name
    assert run({"logits": z, "labels": y}, "ece", scope="classwise")[0].value == 0.0
    # Every label the same class of three: the references agree.
    z, _ = data(60, 3)
    y = torch.full((60,), 2)
    _, _, probs = top_label(z, y)
    assert_close(run({"logits": z, "labels": y}, "ece")[0].value, uc.get_ece(probs, y.numpy()), rtol=1e-9)
    assert_close(
        run({"logits": z, "labels": y}, "ece", scope="classwise")[0].value, uc.get_ece(probs, y.numpy(), mode="marginal"), rtol=1e-9
    )
    # Binary targets all 0.
    zb = torch.randn(40, dtype=torch.float64)
    tb = torch.zeros(40, dtype=torch.float64)
    ref = uc.get_ece(torch.sigmoid(zb).numpy(), tb.numpy().astype(np.int64))
    assert_close(run({"logits": zb, "targets": tb}, "ece", scope="positive_class")[0].value, ref, rtol=1e-9)


@pytest.mark.parametrize("name", BINNED + ("temperature",))
def test_all_ignored_is_nan_with_a_diagnostic(name):
    z = torch.randn(5, 3)
    got, out = run({"logits": z, "labels": torch.full((5,), -100)}, name)
    assert math.isnan(got.value)
    assert got.denominator == 0
    assert "all_ignored" in [d.code for d in out.diagnostics]


def test_nan_scores_give_nan_with_a_diagnostic():
    z, y = data(20, 3, dtype=torch.float32)
    z[4, 1] = math.nan
    z[7, 0] = math.inf
    for name in BINNED + ("temperature",):
        got, out = run({"logits": z, "labels": y}, name)
        assert math.isnan(got.value), name
        assert "nan_or_inf" in [d.code for d in out.diagnostics]


def test_temperature_of_an_impossible_label_is_nan():
    # A label of probability 0 has infinite NLL at every temperature: there is no optimum.
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.7, 0.1]], dtype=torch.float64)
    got, _ = run({"logits": p, "labels": torch.tensor([2, 1])}, "temperature", input_kind="probs")
    assert math.isnan(got.value) and math.isinf(got.values["nll_at_1"])


# -- debiased ECE ----------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [5, 15, 40])
def test_debiased_matches_uncertainty_calibration(n_bins):
    z, y = data(257, 4, scale=1.0)
    conf, correct, probs = top_label(z, y)
    got, _ = run({"logits": z, "labels": y}, "debiased_ece", n_bins=n_bins)
    ref = uc.lower_bound_scaling_ce(
        probs, y.numpy(), p=2, debias=True, num_bins=n_bins, binning_scheme=uc.get_equal_prob_bins, mode="top-label"
    )
    assert_close(got.value, ref, rtol=1e-9, atol=1e-12)
    binned = uc.bin(list(zip(conf, correct)), uc.get_equal_prob_bins(conf, n_bins))
    assert_close(got.values["squared"], uc.unbiased_square_ce(binned), rtol=1e-9, atol=1e-15)


def test_debiased_small_bins_contribute_zero_and_negative_square_is_kept():
    # One sample per occupied bin: every bin has n_b < 2, so the estimate is 0.
    p = torch.tensor([0.05, 0.35, 0.65, 0.95], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    got, _ = run({"logits": p, "targets": t}, "debiased_ece", n_bins=10, scope="positive_class", input_kind="probs")
    assert got.values["squared"] == 0.0 and got.value == 0.0
    # A perfectly calibrated bin estimates a negative square: value clamps to 0, squared keeps it.
    p = torch.full((10,), 0.55, dtype=torch.float64)
    t = torch.tensor([1.0] * 5 + [0.0] * 5, dtype=torch.float64)
    p[:] = 0.5 + 1e-9
    got, _ = run({"logits": p, "targets": t}, "debiased_ece", n_bins=2, scope="positive_class", input_kind="probs")
    ref = uc.unbiased_square_ce(uc.bin(list(zip(p.numpy(), t.numpy())), uc.get_equal_prob_bins(None, 2)))
    assert ref < 0
    assert_close(got.values["squared"], ref, rtol=1e-9)
    assert got.value == 0.0


# -- adaptive ECE --------------------------------------------------------------


@pytest.mark.parametrize("n, n_bins", [(257, 15), (100, 10), (7, 15), (1, 15), (64, 64)])
def test_adaptive_matches_get_ece_em(n, n_bins):
    z, y = data(n, 4, scale=1.0)
    _, _, probs = top_label(z, y)
    got, out = run({"logits": z, "labels": y}, "adaptive_ece", n_bins=n_bins)
    assert_close(got.value, uc.get_ece_em(probs, y.numpy(), num_bins=n_bins), rtol=1e-9, atol=1e-15)
    assert got.values["exact"] == 1.0
    assert "binned_estimate" not in [d.code for d in out.diagnostics]


def test_adaptive_ties_and_positive_class():
    # Repeated confidences make duplicate equal-mass edges, deduplicated as get_equal_bins does.
    p = torch.tensor([0.2] * 6 + [0.7] * 5 + [0.9] * 3 + [1.0] * 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.float64)
    got, _ = run({"logits": p, "targets": t}, "adaptive_ece", n_bins=5, scope="positive_class", input_kind="probs")
    assert_close(got.value, uc.get_ece_em(p.numpy(), t.numpy().astype(np.int64), num_bins=5), rtol=1e-12)


def reference_histogram_adaptive(conf, correct, n_bins, fine=ADAPTIVE_HISTOGRAM_BINS):
    """Float64 formula: fine equal-width bins, each given whole to the equal-mass bin of its middle sample's quantile."""
    n, sc, sa = reference_bins(conf, correct, fine)
    total = n.sum()
    b = min(n_bins, int(total))
    before = np.cumsum(n) - n
    coarse = np.clip(np.floor((before + n / 2) * b / total), 0, b - 1).astype(int)
    cn, csc, csa = (np.bincount(coarse, w, b) for w in (n, sc, sa))
    return float(np.abs(csa - csc).sum() / total)


def test_adaptive_across_batches_uses_the_histogram_and_says_so():
    z, y = data(400, 4, scale=1.0)
    conf, correct, probs = top_label(z, y)
    spec = {"name": "adaptive_ece", "params": {"n_bins": 10}}
    acc = Accumulator([spec])
    for s in random_splits(400, 4, np.random.default_rng(1)):
        acc.add(split_tensors({"logits": z, "labels": y}, s))
    out = acc.result()
    got = out["adaptive_ece"]
    ref = reference_histogram_adaptive(conf, correct, 10)
    assert got.values["exact"] == 0.0
    assert_close(got.value, ref, rtol=1e-9)
    assert_close(got.values["histogram_value"], ref, rtol=1e-9)
    assert "binned_estimate" in [d.code for d in out.diagnostics]
    # The estimate is close to the exact value, which one request gives.
    exact = uc.get_ece_em(probs, y.numpy(), num_bins=10)
    assert abs(got.value - exact) < 0.02
    whole = run({"logits": z, "labels": y}, "adaptive_ece", n_bins=10)[0]
    assert_close(whole.value, exact, rtol=1e-9)
    assert_close(whole.values["histogram_value"], ref, rtol=1e-9)


def test_adaptive_merge_is_exact_over_histograms_and_stays_exact_with_empty_batches():
    z, y = data(300, 3)
    spec = {"name": "adaptive_ece", "params": {"n_bins": 15}}
    results = []
    for seed, parts in ((0, 3), (1, 5), (2, 7)):
        acc = Accumulator([spec])
        for s in random_splits(300, parts, np.random.default_rng(seed)):
            acc.add(split_tensors({"logits": z, "labels": y}, s))
        results.append(acc.result()["adaptive_ece"].value)
    assert_close(results[1:], [results[0]] * 2, rtol=1e-9)
    # A batch whose labels are all ignored adds nothing: the value stays exact.
    acc = Accumulator([spec])
    acc.add({"logits": z, "labels": y})
    acc.add({"logits": z[:5], "labels": torch.full((5,), -100)})
    got = acc.result()["adaptive_ece"]
    assert got.values["exact"] == 1.0
    assert_close(got.value, run({"logits": z, "labels": y}, "adaptive_ece")[0].value, rtol=1e-12)


# -- reliability diagram ------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [5, 15, 40])
def test_reliability_diagram_matches_calibration_curve(n_bins):
    z, y = data(257, 6, scale=1.5)
    conf, correct, _ = top_label(z, y)
    got, _ = run({"logits": z, "labels": y}, "reliability_diagram", n_bins=n_bins)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    count = got.tensors["count"]
    nonempty = count > 0
    assert_close(got.tensors["accuracy"][nonempty], prob_true, rtol=1e-12)
    assert_close(got.tensors["mean_confidence"][nonempty], prob_pred, rtol=1e-12)
    assert count.sum() == 257
    assert_close(got.tensors["bin_edges"], np.linspace(0, 1, n_bins + 1), rtol=1e-15, atol=1e-16)
    n, sc, sa = reference_bins(conf, correct, n_bins)
    assert_close(count, n, rtol=0)
    assert_close(got.values["over_confidence"], np.clip(sc - sa, 0, None).sum() / 257, rtol=1e-9)
    assert_close(got.values["under_confidence"], np.clip(sa - sc, 0, None).sum() / 257, rtol=1e-9)
    assert_close(got.value, reference_ece(conf, correct, n_bins, "l1"), rtol=1e-9)


def test_reliability_diagram_positive_class():
    zb = torch.randn(300, dtype=torch.float64) * 2
    tb = (torch.rand(300, dtype=torch.float64) < torch.sigmoid(zb * 0.7)).double()
    got, _ = run({"logits": zb, "targets": tb}, "reliability_diagram", n_bins=8, scope="positive_class")
    prob_true, prob_pred = calibration_curve(tb.numpy(), torch.sigmoid(zb).numpy(), n_bins=8)
    nonempty = got.tensors["count"] > 0
    assert_close(got.tensors["accuracy"][nonempty], prob_true, rtol=1e-12)
    assert_close(got.tensors["mean_confidence"][nonempty], prob_pred, rtol=1e-12)


# -- temperature --------------------------------------------------------------


def optimal_temperature(nll):
    res = minimize_scalar(lambda u: nll(math.exp(u)), bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-10})
    return math.exp(res.x), res.fun


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_temperature_matches_scipy(dtype, scale):
    z, y = data(257, 5, scale=scale, dtype=dtype)
    zd = z.double()

    def nll(t):
        return torch.nn.functional.cross_entropy(zd / t, y).item()

    t_ref, nll_ref = optimal_temperature(nll)
    got, _ = run({"logits": z, "labels": y}, "temperature")
    assert got.values["at_grid_edge"] == 0.0
    assert_close(got.value, t_ref, rtol=1e-3)  # the parabola on a 256-point grid: about 3e-4
    assert_close(got.values["nll"], nll_ref, rtol=1e-6 if dtype == torch.float64 else 1e-5)
    assert_close(got.values["nll_at_1"], nll(1.0), **tol(dtype) if dtype != torch.float64 else dict(rtol=1e-12))
    curve = got.tensors["nll_curve"]
    temps = got.tensors["temperatures"]
    assert temps.shape == curve.shape == (256,)
    assert_close(temps[[0, -1]], [0.05, 20.0], rtol=1e-12)
    assert_close(curve[::51], [nll(float(t)) for t in temps[::51]], rtol=1e-9 if dtype == torch.float64 else 1e-5)


def test_temperature_grid_parameters_and_binary():
    z = torch.randn(300, dtype=torch.float64) * 4
    t = (torch.rand(300, dtype=torch.float64) < torch.sigmoid(z / 2.5)).double()

    def nll(temp):
        return torch.nn.functional.binary_cross_entropy_with_logits(z / temp, t).item()

    t_ref, nll_ref = optimal_temperature(nll)
    got, _ = run({"logits": z, "targets": t}, "temperature", t_min=0.5, t_max=10.0, grid_points=64)
    assert got.tensors["temperatures"].shape == (64,)
    assert_close(got.value, t_ref, rtol=5e-3)
    assert_close(got.values["nll"], nll_ref, rtol=1e-5)
    assert_close(got.values["nll_at_1"], nll(1.0), rtol=1e-12)


def test_temperature_at_grid_edge_is_flagged():
    # Separable data with wide margins: NLL keeps falling as T -> 0.
    z = torch.tensor([[5.0, -5.0], [-5.0, 5.0]] * 10, dtype=torch.float64)
    y = torch.tensor([0, 1] * 10)
    got, _ = run({"logits": z, "labels": y}, "temperature")
    assert got.values["at_grid_edge"] == 1.0
    assert_close(got.value, 0.05, rtol=1e-12)


@pytest.mark.parametrize("block", [1 << 22, 3000, 10])
def test_temperature_and_classwise_blocks(monkeypatch, block):
    # K · G above one block (a large vocabulary): rows and the grid are processed in pieces, same result.
    monkeypatch.setattr(temperature_module, "TEMPERATURE_BLOCK", block)
    monkeypatch.setattr(ece_module, "CLASSWISE_BLOCK", block)
    z, y = data(37, 50, scale=1.0)
    y[3] = -100
    got, _ = run({"logits": z, "labels": y}, "temperature", grid_points=90)
    keep = y != -100
    ref = [torch.nn.functional.cross_entropy(z[keep] / float(t), y[keep]).item() for t in got.tensors["temperatures"][::10]]
    assert_close(got.tensors["nll_curve"][::10], ref, rtol=1e-12)
    _, _, probs = top_label(z[keep], y[keep])
    cw, _ = run({"logits": z, "labels": y}, "ece", scope="classwise")
    assert_close(cw.value, uc.get_ece(probs, y[keep].numpy(), mode="marginal"), rtol=1e-9)


# -- merging -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "ece",
        {"name": "ece", "params": {"norm": "l2", "n_bins": 7}},
        {"name": "ece", "params": {"norm": "max"}},
        {"name": "ece", "params": {"scope": "classwise"}},
        "mce",
        "debiased_ece",
        "reliability_diagram",
        "temperature",
    ],
)
def test_merge_is_exact(spec):
    z, y = data(211, 4, dtype=torch.float32)
    y[::9] = -100
    assert_merge_exact({"logits": z, "labels": y}, spec, parts=5)


@pytest.mark.parametrize("name", ["ece", "debiased_ece", "reliability_diagram", "temperature"])
def test_merge_is_exact_binary(name):
    z = torch.randn(150, dtype=torch.float64) * 2
    t = (torch.rand(150) < 0.5).double()
    params = {} if name == "temperature" else {"scope": "positive_class"}
    assert_merge_exact({"logits": z, "targets": t}, {"name": name, "params": params}, parts=4)


def test_merge_adaptive_single_part_is_the_unsplit_value():
    z, y = data(50, 3)
    assert_merge_exact({"logits": z, "labels": y}, "adaptive_ece", parts=1)


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors, name, params, field, match",
    [
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            "ece",
            {"scope": "positive_class"},
            "functions[0].params.scope",
            "K=3",
        ),
        ({"logits": torch.randn(4, 3)}, "ece", {}, "tensors.labels", "need class indices"),
        ({"logits": torch.randn(4), "labels": torch.tensor([0, 1, 1, 0])}, "ece", {}, "tensors.targets", "need 0/1 targets"),
        (
            {"logits": torch.randn(4), "targets": torch.tensor([0.0, 0.5, 1.0, 0.0])},
            "ece",
            {},
            "tensors.targets",
            "hard 0/1 targets, got 0.5 at flat index 1",
        ),
        ({"logits": torch.randn(4), "targets": torch.tensor([0.0, 1.0])}, "ece", {}, "tensors.targets", r"expected shape \[4\]"),
        (
            {"logits": torch.tensor([0.2, 1.5]), "targets": torch.tensor([0.0, 1.0])},
            "ece",
            {"input_kind": "probs"},
            "tensors.logits",
            "probabilities in",
        ),
        (
            {"logits": torch.tensor([-0.2, 0.5]), "targets": torch.tensor([0.0, 1.0])},
            "ece",
            {"input_kind": "log_probs"},
            "tensors.logits",
            "<= 0",
        ),
        ({"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 3, 0])}, "mce", {}, "tensors.labels", "got 3 at flat index 2"),
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            "ece",
            {"n_bins": 0},
            "functions[0].params.n_bins",
            r"\[1, 1000\]",
        ),
        ({"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])}, "ece", {"norm": "l3"}, "functions[0].params.norm", "one of"),
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            "debiased_ece",
            {"scope": "classwise"},
            "functions[0].params.scope",
            "one of",
        ),
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            "temperature",
            {"t_min": 5.0, "t_max": 2.0},
            "functions[0].params.t_max",
            "t_max > t_min",
        ),
        (
            {"logits": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 0])},
            "temperature",
            {"t_min": 0.0},
            "functions[0].params.t_min",
            "> 0",
        ),
        (
            {"logits": torch.randint(0, 3, (4, 3)), "labels": torch.tensor([0, 1, 2, 0])},
            "reliability_diagram",
            {},
            "tensors.logits",
            "floating-point",
        ),
        ({"logits": torch.tensor(1.0), "labels": torch.tensor(0)}, "ece", {}, "tensors.logits", "expected shape"),
    ],
)
def test_errors_name_the_field(tensors, name, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field


def test_shared_row_statistics_and_listing():
    from lossd.kernels import get_function

    z, y = data(64, 4)
    out = evaluate({"logits": z, "labels": y}, ["cross_entropy", "ece", "reliability_diagram", "temperature"])
    assert out.diagnostics == []
    for name in BINNED + ("temperature",):
        fdef = get_function(name)
        # adaptive_ece's equal-mass edges need the whole batch: never split (see test_calibration_edges.py)
        assert fdef.family == "calibration" and fdef.splittable == (name != "adaptive_ece")
        assert {r.name for r in fdef.roles} == {"logits", "labels", "targets"}
