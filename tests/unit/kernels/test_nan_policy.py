"""nan_policy: omit equals the references on the finite rows, raise names the tensor and index, propagate is unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lossd.kernels import Accumulator, InvalidInput, evaluate

N, K = 40, 5
BAD_ROWS = [3, 17, 31]
MSE = {"name": "mse", "inputs": {"predictions": "y_pred", "targets": "y_true"}}


def classification_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Logits with NaN / inf in BAD_ROWS, labels, predictions/targets (with one bad target row), and the keep mask."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, K, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (N,), generator=g)
    logits[3, 1] = math.nan
    logits[17, 4] = math.inf
    predictions = torch.randn(N, 3, generator=g, dtype=torch.float64)
    targets = torch.randn(N, 3, generator=g, dtype=torch.float64)
    targets[31, 2] = -math.inf
    keep = torch.ones(N, dtype=torch.bool)
    keep[BAD_ROWS] = False
    return {"logits": logits, "labels": labels, "y_pred": predictions, "y_true": targets}, keep


def test_omit_equals_references_on_the_finite_rows() -> None:
    tensors, _ = classification_batch()
    out = evaluate(tensors, ["cross_entropy", "accuracy", {"name": "ece", "params": {"n_bins": 10}}, MSE], nan_policy="omit")
    logit_rows = torch.isfinite(tensors["logits"]).all(1)  # rows 3 and 17: only the logits' functions drop them
    target_rows = torch.isfinite(tensors["y_true"]).all(1)  # row 31: only mse drops it
    z, y = tensors["logits"][logit_rows], tensors["labels"][logit_rows]
    assert out["cross_entropy"].value == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-12)
    assert out["cross_entropy"].denominator == N - 2
    assert out["accuracy"].value == pytest.approx(float((z.argmax(1) == y).double().mean()), rel=1e-12)
    # ECE: the reference is the ECE of the finite rows sent alone (binning itself is tested elsewhere).
    clean = evaluate({"logits": z, "labels": y}, [{"name": "ece", "params": {"n_bins": 10}}])
    assert out["ece"].value == pytest.approx(clean["ece"].value, rel=1e-12)
    p, t = tensors["y_pred"][target_rows], tensors["y_true"][target_rows]
    assert out["mse"].value == pytest.approx(float(F.mse_loss(p, t)), rel=1e-12)
    omitted = {d.function: d for d in out.diagnostics if d.code == "rows_omitted"}
    assert set(omitted) == {"cross_entropy", "accuracy", "ece", "mse"}
    assert "dropped 2 of 40 rows" in omitted["cross_entropy"].message and "'logits'" in omitted["cross_entropy"].message
    assert "dropped 1 of 40 rows" in omitted["mse"].message and "'y_true'" in omitted["mse"].message
    assert "nan_or_inf" not in [d.code for d in out.diagnostics]  # nothing computed is NaN


def test_omit_binary_auroc_equals_sklearn_on_the_finite_rows() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=200)
    targets = (rng.random(200) < 0.4).astype(np.float64)
    scores[[5, 50, 150]] = [np.nan, np.inf, -np.inf]
    keep = np.isfinite(scores)
    out = evaluate({"logits": torch.from_numpy(scores), "targets": torch.from_numpy(targets)}, ["auroc"], nan_policy="omit")
    assert out["auroc"].value == pytest.approx(roc_auc_score(targets[keep], scores[keep]), rel=1e-12)


def test_omit_drops_rows_with_a_nan_in_weights_too() -> None:
    tensors, _ = classification_batch()
    weights = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights[8] = math.nan
    out = evaluate({"logits": tensors["logits"], "labels": tensors["labels"], "weights": weights}, ["cross_entropy"], nan_policy="omit")
    rows = torch.isfinite(tensors["logits"]).all(1) & torch.isfinite(weights)
    terms = F.cross_entropy(tensors["logits"][rows], tensors["labels"][rows], reduction="none")
    reference = float((terms * weights[rows]).sum() / weights[rows].sum())
    assert out["cross_entropy"].value == pytest.approx(reference, rel=1e-12)
    assert "dropped 3 of 40 rows" in next(d.message for d in out.diagnostics if d.code == "rows_omitted")


def test_omit_on_clean_data_changes_nothing() -> None:
    tensors, keep = classification_batch()
    clean = {name: t[keep] for name, t in tensors.items()}
    a = evaluate(clean, ["cross_entropy", "accuracy", MSE])
    b = evaluate(clean, ["cross_entropy", "accuracy", MSE], nan_policy="omit")
    assert {k: r.values for k, r in a.results.items()} == {k: r.values for k, r in b.results.items()}
    assert b.diagnostics == []


def test_raise_names_the_tensor_the_flat_index_and_the_row() -> None:
    tensors, _ = classification_batch()
    ce_tensors = {name: tensors[name] for name in ("logits", "labels")}
    mse_tensors = {name: tensors[name] for name in ("y_pred", "y_true")}
    with pytest.raises(InvalidInput) as info:
        evaluate(ce_tensors, ["cross_entropy"], nan_policy="raise")
    (violation,) = info.value.violations
    assert violation.field == "tensors.logits"
    assert "holds NaN at flat index 16 (row 3)" in violation.description  # 3 * K + 1
    assert "nan_or_inf" in [d.code for d in info.value.diagnostics]
    with pytest.raises(InvalidInput) as info:
        evaluate(mse_tensors, [MSE], nan_policy="raise")
    assert info.value.violations[0].field == "tensors.y_true"
    assert "holds -inf at flat index 95 (row 31)" in info.value.violations[0].description  # 31 * 3 + 2


def test_a_tensor_no_function_reads_is_refused_as_unread_not_judged() -> None:
    tensors, _ = classification_batch()
    with pytest.raises(InvalidInput) as info:  # y_true holds -inf, but no function reads it: that is the error
        evaluate({**tensors, "logits": torch.zeros(N, K)}, ["cross_entropy"], nan_policy="raise")
    assert [v.field for v in info.value.violations] == ["tensors.y_pred", "tensors.y_true"]
    assert all("no requested function reads" in v.description for v in info.value.violations)
    read = {"logits": torch.zeros(N, K), "labels": tensors["labels"]}
    assert evaluate(read, ["cross_entropy"], nan_policy="raise")["cross_entropy"].value == pytest.approx(math.log(K))


def test_propagate_is_the_default_and_unchanged() -> None:
    tensors, _ = classification_batch()
    default = evaluate(tensors, ["cross_entropy", MSE])
    explicit = evaluate(tensors, ["cross_entropy", MSE], nan_policy="propagate")
    assert math.isnan(default["cross_entropy"].value) and math.isnan(explicit["cross_entropy"].value)
    assert math.isinf(default["mse"].value)
    assert [d.code for d in default.diagnostics] == [d.code for d in explicit.diagnostics] == ["nan_or_inf"]


def test_unknown_policy_and_omit_without_rows_are_refused() -> None:
    tensors, _ = classification_batch()
    with pytest.raises(InvalidInput) as info:
        evaluate(tensors, ["cross_entropy"], nan_policy="ignore")
    assert info.value.violations[0].field == "nan_policy"
    with pytest.raises(InvalidInput) as info:
        Accumulator(["ctc"], nan_policy="omit")
    assert info.value.violations[0].field == "nan_policy" and "ctc" in info.value.violations[0].description
    with pytest.raises(InvalidInput) as info:
        evaluate(tensors, [{"name": "cross_entropy", "params": {"reduction": "none"}}], nan_policy="omit")
    assert "reduction='none'" in info.value.violations[0].description


def test_omit_refuses_a_nan_in_a_tensor_shared_by_every_row() -> None:
    g = torch.Generator().manual_seed(3)
    class_weights = torch.randn(4, 6, generator=g)
    class_weights[1, 2] = math.nan
    tensors = {
        "embeddings": torch.randn(10, 4, generator=g),
        "labels": torch.randint(0, 6, (10,), generator=g),
        "class_weights": class_weights,
    }
    with pytest.raises(InvalidInput) as info:
        evaluate(tensors, ["arcface"], nan_policy="omit")
    assert info.value.violations[0].field == "tensors.class_weights"
    assert "flat index 8 (row 1)" in info.value.violations[0].description


def test_accumulator_names_the_first_batch_with_nan_and_omits_over_a_stream() -> None:
    tensors, keep = classification_batch()
    clean = {"logits": tensors["logits"][keep], "labels": tensors["labels"][keep]}
    dirty = {"logits": tensors["logits"], "labels": tensors["labels"]}
    acc = Accumulator(["cross_entropy"], nan_policy="omit")
    for i, batch in enumerate([clean, clean, dirty, dirty]):
        acc.add(batch, request_id=f"req-{i}")
    result = acc.result()
    rows = torch.isfinite(tensors["logits"]).all(1)
    z = torch.cat([clean["logits"], clean["logits"], tensors["logits"][rows], tensors["logits"][rows]])
    y = torch.cat([clean["labels"], clean["labels"], tensors["labels"][rows], tensors["labels"][rows]])
    assert result["cross_entropy"].value == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-12)
    first = [d for d in result.diagnostics if d.code == "first_nonfinite_batch"]
    assert len(first) == 1 and first[0].count == 1
    assert first[0].message.startswith("batch 2 (request id 'req-2') first brought NaN")
    assert next(d for d in result.diagnostics if d.code == "rows_omitted").count == 2

    propagating = Accumulator(["cross_entropy"])
    propagating.add(clean, request_id="a")
    propagating.add(dirty, "part-1", request_id="b")
    message = next(d.message for d in propagating.result().diagnostics if d.code == "first_nonfinite_batch")
    assert message.startswith("batch 1 (batch_id 'part-1', request id 'b')")
