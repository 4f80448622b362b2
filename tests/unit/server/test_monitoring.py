"""Monitoring: the cardinality guard, the exported sufficient statistics, history and the observer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from helpers import assert_close
from lossd.kernels import evaluate
from lossd.kernels.evaluate import FunctionSpec
from lossd.server.monitoring import (
    OTHER,
    EvaluationEvent,
    History,
    LabelGuard,
    Monitoring,
    SeriesBudget,
    calibration_counts,
    expected_calibration_error,
    loss_sums,
    row_counts,
)
from lossd.server.monitoring.calibration import Calibration
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb


def _classification(n: int = 256, k: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) * 2
    logits[torch.arange(n), labels] += 1.5  # better than chance, imperfectly calibrated
    return {"logits": logits, "labels": labels}


def _observe(tensors: dict[str, torch.Tensor], functions: list, *, tags: pb.Tags | None = None, prior=None) -> EvaluationEvent:  # type: ignore[no-untyped-def]
    evaluation = evaluate(tensors, functions, prior_states=prior)
    tags = tags or pb.Tags(model="m", dataset="d", split="s")
    return EvaluationEvent("Evaluate", 1, tags, evaluation, evaluation.batch, evaluation.prepared, prior or {})


def _calibration(tensors: dict[str, torch.Tensor], functions: list, bins: int = 15) -> Calibration | str:
    evaluation = evaluate(tensors, functions)
    assert evaluation.batch is not None
    return calibration_counts(evaluation.batch, evaluation.prepared, bins)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- the cardinality guard ---------------------------------------------------------------------


def _series(registry: CollectorRegistry, *, budgeted: bool) -> int:
    """Samples of the families with client-chosen labels (budgeted) or of all families."""
    return sum(len(f.samples) for f in registry.collect() if not budgeted or any("model" in s.labels for s in f.samples))


def test_10000_distinct_tag_sets_stay_under_the_series_caps() -> None:
    settings = Settings(max_series_per_family=600, device="cpu")
    monitoring = Monitoring(settings)
    tensors = {"logits": torch.randn(8, 3), "labels": torch.arange(8) % 3}  # calibration bins too: 15 series per tag set
    evaluation = evaluate(tensors, ["cross_entropy", "accuracy"])
    for i in range(10_000):
        tags = pb.Tags(model=f"model-{i}", dataset=f"data-{i % 7}", split=f"split-{i % 3}")
        monitoring.observe(EvaluationEvent("Evaluate", i, tags, evaluation, evaluation.batch, evaluation.prepared))
    r = monitoring.registry
    budgeted = _series(r, budgeted=True)
    counted = _samples(r, "lossd_monitoring_series")
    assert budgeted <= sum(counted.values()) < 3_000, f"{budgeted} series with client labels for 10,000 tag sets"
    for family in r.collect():
        if any("model" in s.labels for s in family.samples):
            assert len(family.samples) <= settings.max_series_per_family, family.name
    assert _series(r, budgeted=False) < 3_500  # the rest is bounded by construction
    # The calibration families (15 series per tag set) hit their cap first: 600 // 15 − 1 reserved for __other__.
    models = {dict(k)["model"] for k in _samples(r, "lossd_calibration_predictions_total")}
    admitted = settings.max_series_per_family // settings.calibration_bins - 1
    assert len(models) == admitted + 1 and OTHER in models
    folded = _samples(r, "lossd_monitoring_folded_total")
    assert folded == {(("reason", "family_cap"),): float(10_000 - admitted)}
    # Nothing is lost: the folded evaluations are counted under __other__, and the totals are exact.
    counts = _samples(r, "lossd_loss_denominator_total")
    assert sum(counts.values()) == 10_000 * 8
    assert counts[(("dataset", OTHER), ("function", "cross_entropy"), ("model", OTHER), ("split", OTHER))] == (10_000 - admitted) * 8
    assert sum(_samples(r, "lossd_calibration_predictions_total").values()) == 10_000 * 8
    limits = _samples(r, "lossd_monitoring_series_limit")
    assert limits == {(("scope", "per_family"),): 600.0, (("scope", "total"),): 50_000.0}
    assert counted[(("family", "lossd_calibration_predictions"),)] == (admitted + 1) * 15 <= 600


def test_the_total_cap_binds_across_families() -> None:
    settings = Settings(max_series_per_family=10_000, max_series_total=300, calibration_bins=10, device="cpu")
    monitoring = Monitoring(settings)
    evaluation = evaluate({"logits": torch.randn(4, 3), "labels": torch.arange(4) % 3}, ["cross_entropy"])
    for i in range(500):
        monitoring.observe(EvaluationEvent("Evaluate", i, pb.Tags(model=f"m{i}"), evaluation, evaluation.batch, evaluation.prepared))
    assert _series(monitoring.registry, budgeted=True) <= 300
    assert set(_samples(monitoring.registry, "lossd_monitoring_folded_total")) == {(("reason", "total_cap"),)}


def test_guard_length_allowlist_and_unset() -> None:
    guard = LabelGuard(max_length=8, allowlist=["resnet", "vit"])
    assert guard.refusal("model", "resnet") is None
    assert guard.refusal("model", "llama") == "not_allowlisted"
    assert guard.refusal("model", "a-very-long-name") == "too_long"
    assert guard.refusal("model", "") is None and guard.refusal("model", OTHER) is None
    assert guard.refusal("function", "cross_entropy_x") == "too_long"  # the allowlist is for tags only
    assert guard.refusal("function", "ce") is None


def test_a_too_long_tag_folds_that_tag_and_is_counted() -> None:
    monitoring = Monitoring(Settings(device="cpu", label_max_length=8))
    evaluation = evaluate({"predictions": torch.zeros(3), "targets": torch.ones(3)}, ["mse"])
    tags = pb.Tags(model="a-very-long-model-name", dataset="d", split="s")
    monitoring.observe(EvaluationEvent("Evaluate", 1, tags, evaluation, evaluation.batch, evaluation.prepared))
    assert _samples(monitoring.registry, "lossd_loss_denominator_total") == {
        (("dataset", "d"), ("function", "mse"), ("model", OTHER), ("split", "s")): 3.0
    }
    assert _samples(monitoring.registry, "lossd_monitoring_folded_total") == {(("reason", "too_long"),): 1.0}


def test_budget_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="expected >= 1, got 0 and 5"):
        SeriesBudget(max_per_family=0, max_total=5)


# -- sufficient statistics -----------------------------------------------------------------------


def test_loss_sums_are_numerator_and_denominator_of_means_only() -> None:
    tensors = _classification()
    obs = _observe(tensors, ["cross_entropy", "ece", "accuracy", "f1", FunctionSpec("cross_entropy", {"reduction": "sum"}, alias="ce_sum")])
    sums = loss_sums(obs.evaluation, obs.prior_states)
    ce = obs.evaluation.results["cross_entropy"]
    assert sums.sums["cross_entropy"] == pytest.approx((ce.value * 256, 256.0), rel=1e-12)
    assert sums.sums["ce_sum"] == pytest.approx((ce.value * 256, 256.0), rel=1e-9)  # value itself is the numerator
    assert "accuracy" in sums.sums
    assert "ece" not in sums.sums and "f1" not in sums.sums  # not additive means
    assert sums.skipped == {}


def test_loss_sums_subtract_prior_states() -> None:
    """A client run (one batch per call, prior_states merged in) counts each batch once."""
    tensors = _classification(n=300)
    first = {k: v[:100] for k, v in tensors.items()}
    second = {k: v[100:] for k, v in tensors.items()}
    a = evaluate(first, ["cross_entropy"], return_state=True)
    obs = _observe(second, ["cross_entropy"], prior={"cross_entropy": a.results["cross_entropy"].state})
    num, den = loss_sums(obs.evaluation, obs.prior_states).sums["cross_entropy"]
    alone = evaluate(second, ["cross_entropy"]).results["cross_entropy"]
    assert den == pytest.approx(200.0)
    assert num == pytest.approx(alone.value * 200, rel=1e-9)


def test_loss_sums_skip_what_a_counter_cannot_hold() -> None:
    tensors = {"predictions": torch.tensor([0.0, 1.0]), "targets": torch.tensor([0.0, 1.0]), "variance": torch.tensor([1e-3, 1e-3])}
    obs = _observe(tensors, ["gaussian_nll"])
    assert obs.evaluation.results["gaussian_nll"].value < 0
    assert loss_sums(obs.evaluation).skipped == {"gaussian_nll": "negative"}


def test_calibration_counts_are_the_ece_functions_bins() -> None:
    tensors = _classification(n=1000)
    tensors["labels"][:7] = -100  # ignore_index rows are left out by both
    cal = _calibration(tensors, ["cross_entropy"])
    assert isinstance(cal, Calibration) and cal.total == 993
    ece = evaluate(tensors, [{"name": "ece", "params": {"n_bins": 15}}, "reliability_diagram"])
    assert_close(
        expected_calibration_error(cal.count, cal.confidence, cal.correct),
        ece.results["ece"].value,
        rtol=1e-12,
        atol=0,
        what="ECE from counters",
    )
    assert_close(cal.count, ece.results["reliability_diagram"].tensors["count"], rtol=0, atol=0, what="per-bin counts")


def test_calibration_edges_follow_the_catalogue() -> None:
    # Logits giving top-1 confidence exactly 1.0 (last bin) and exactly 0.5 with B=2 (bin 0: (0, 0.5]).
    tensors = {"logits": torch.tensor([[0.0, 0.0], [200.0, 0.0]], dtype=torch.float64), "labels": torch.tensor([0, 0])}
    cal = _calibration(tensors, ["accuracy"], bins=2)
    assert isinstance(cal, Calibration)
    assert cal.count.tolist() == [1.0, 1.0] and cal.confidence.tolist() == [0.5, 1.0] and cal.correct.tolist() == [1.0, 1.0]


def test_row_counts_follow_role_mappings() -> None:
    lm = evaluate(
        {"lm": torch.zeros(4, 5, 7), "tok": torch.zeros(4, 5, dtype=torch.int64)},
        [{"name": "lm_cross_entropy", "inputs": {"logits": "lm", "labels": "tok"}}],
    )
    assert lm.batch is not None and row_counts(lm.batch, lm.prepared) == (4, 20)
    reg = evaluate({"predictions": torch.zeros(9), "targets": torch.zeros(9)}, ["mse"])
    assert reg.batch is not None and row_counts(reg.batch, reg.prepared) == (9, 9)


# -- the observer --------------------------------------------------------------------------------


def test_observe_exports_exact_sums_and_initialises_every_bin() -> None:
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=10))
    tensors = _classification(n=500)
    for half in (slice(0, 200), slice(200, 500)):
        monitoring.observe(_observe({k: v[half] for k, v in tensors.items()}, ["cross_entropy", {"name": "ece", "params": {"n_bins": 10}}]))
    whole = evaluate(tensors, ["cross_entropy", {"name": "ece", "params": {"n_bins": 10}}])
    r = monitoring.registry
    loss = _samples(r, "lossd_loss_numerator_total")
    count = _samples(r, "lossd_loss_denominator_total")
    key = (("dataset", "d"), ("function", "cross_entropy"), ("model", "m"), ("split", "s"))
    assert_close(loss[key] / count[key], whole.results["cross_entropy"].value, rtol=1e-12, what="mean loss from counters")
    bins = {
        name: np.array(
            [_samples(r, name)[(("bin_upper", f"{(b + 1) / 10:.4f}"), ("dataset", "d"), ("model", "m"), ("split", "s"))] for b in range(10)]
        )
        for name in ("lossd_calibration_predictions_total", "lossd_calibration_confidence_total", "lossd_calibration_correct_total")
    }
    ece = expected_calibration_error(*bins.values())
    assert_close(ece, whole.results["ece"].value, rtol=1e-12, what="ECE from counters")
    assert len(bins["lossd_calibration_predictions_total"]) == 10
    assert _samples(r, "lossd_evaluated_rows_total") == {(("dataset", "d"), ("model", "m"), ("split", "s")): 500.0}
    snapshot = monitoring.history.snapshot()
    (series,) = snapshot["series"]
    assert_close(series["summary"]["ece"], whole.results["ece"].value, rtol=1e-12, what="history ECE")
    assert_close(series["summary"]["loss"]["cross_entropy"], whole.results["cross_entropy"].value, rtol=1e-12, what="history loss")


def test_observe_skips_finalize_and_sums_a_stream_once_it_succeeds() -> None:
    monitoring = Monitoring(Settings(device="cpu"))
    tensors = _classification(n=10)
    evaluation = evaluate(tensors, ["cross_entropy"])
    monitoring.observe(EvaluationEvent("Finalize", 1, pb.Tags(model="m"), evaluation))
    assert _samples(monitoring.registry, "lossd_loss_denominator_total") == {}
    assert (
        _samples(monitoring.registry, "lossd_evaluations_total")[(("dataset", ""), ("method", "Finalize"), ("model", "m"), ("split", ""))]
        == 1
    )
    tags = pb.Tags(model="m")
    for call in (2, 3):  # call 3 fails after its messages: it exports nothing
        for _ in range(3):
            part = evaluate(tensors, ["cross_entropy"])
            monitoring.observe(EvaluationEvent("EvaluateStream", call, tags, None, part.batch, part.prepared))
    monitoring.observe(EvaluationEvent("EvaluateStream", 3, tags, None, aborted=True))
    evaluation.batches = 3  # the stream's loss totals are its evaluation's; its rows come from the messages
    monitoring.observe(EvaluationEvent("EvaluateStream", 2, tags, evaluation, None, evaluation.prepared))
    assert sum(_samples(monitoring.registry, "lossd_calibration_predictions_total").values()) == 30
    assert sum(_samples(monitoring.registry, "lossd_evaluated_rows_total").values()) == 30
    assert sum(_samples(monitoring.registry, "lossd_loss_denominator_total").values()) == 10
    assert len(monitoring._streams) == 0


def test_observe_never_raises() -> None:
    monitoring = Monitoring(Settings(device="cpu"))
    monitoring.observe(EvaluationEvent("Evaluate", 1, pb.Tags(), object()))  # type: ignore[arg-type]
    assert _samples(monitoring.registry, "lossd_monitoring_errors_total") == {(): 1.0}


def test_registries_are_independent() -> None:
    a, b = Monitoring(Settings(device="cpu")), Monitoring(Settings(device="cpu"))
    a.observe(_observe(_classification(n=4), ["cross_entropy"]))
    assert sum(_samples(a.registry, "lossd_loss_denominator_total").values()) == 4
    assert _samples(b.registry, "lossd_loss_denominator_total") == {}


# -- history ---------------------------------------------------------------------------------------


def test_history_buckets_window_and_bounds() -> None:
    clock = [1000.0]
    history = History(seconds=30, interval=10, bins=2, max_series=2, clock=lambda: clock[0])
    ones = (np.array([1.0, 1.0]), np.array([0.2, 0.9]), np.array([0.0, 1.0]))
    history.record(("a", "d", "s"), losses={"ce": (2.0, 1.0)}, calibration=ones, rows=2)
    clock[0] = 1005.0
    history.record(("a", "d", "s"), losses={"ce": (4.0, 1.0)}, rows=1)
    clock[0] = 1012.0
    history.record(("a", "d", "s"), losses={"ce": (1.0, 1.0)}, calibration=ones, rows=2)
    (series,) = history.snapshot()["series"]
    assert [p["t"] for p in series["points"]] == [1000.0, 1010.0]
    assert [p["loss"]["ce"] for p in series["points"]] == [3.0, 1.0]
    assert series["summary"]["loss"]["ce"] == pytest.approx(7 / 3)
    assert series["summary"]["ece"] == pytest.approx((0.2 + 0.1) / 2)
    assert series["reliability"]["count"] == [2.0, 2.0]
    assert series["summary"]["last_seen"] == 1012.0
    # Intervals older than the window drop out; the least recently updated label set goes first.
    clock[0] = 1045.0
    assert [p["t"] for p in history.snapshot()["series"][0]["points"]] == [1010.0]
    history.record(("b", "d", "s"), losses={}, rows=0)
    history.record(("c", "d", "s"), losses={}, rows=0)
    assert [s["model"] for s in history.snapshot()["series"]] == ["b", "c"]


def test_history_json_has_no_nan() -> None:
    history = History(seconds=60, interval=10, bins=3, clock=lambda: 0.0)
    history.record(("m", "", ""), losses={"ce": (math.nan, 0.0)}, calibration=(np.zeros(3), np.zeros(3), np.zeros(3)))
    (series,) = history.snapshot()["series"]
    assert series["points"][0]["loss"] == {"ce": None} and series["points"][0]["ece"] is None
    assert series["reliability"]["accuracy"] == [None, None, None]


def test_function_label_names_the_catalogue_function() -> None:
    from lossd.server.monitoring.core import function_label

    assert function_label("cross_entropy", "cross_entropy") == "cross_entropy"
    assert function_label("cross_entropy", "accuracy") == "accuracy[cross_entropy]"
    assert function_label("ce_smoothed", "cross_entropy") == "cross_entropy[ce_smoothed]"
