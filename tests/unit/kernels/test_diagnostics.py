"""Every diagnostic code fires where the catalogue says, with its severity and an actionable message; clean data raises none."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from catalogue_inputs import valid_inputs
from lossd.kernels import CODES, Accumulator, Diagnostic, Evaluation, InvalidInput, all_functions, evaluate

# The catalogue's severities (CATALOGUE.md, "Diagnostics"), pinned here so that a change is deliberate.
SEVERITY = {
    "probabilities_as_logits": "warning",
    "log_probs_as_logits": "warning",
    "nan_or_inf": "error",
    "labels_out_of_range": "error",
    "all_ignored": "warning",
    "ignored_fraction": "info",
    "multi_label_targets_with_softmax": "warning",
    "class_imbalance": "info",
    "ctc_infeasible": "warning",
    "single_class_auroc": "warning",
    "extreme_temperature": "warning",
    "top_k_covers_all_classes": "warning",
    "precision_loss": "warning",
    "empty_sequences": "info",
    "overflow": "warning",
    "binned_estimate": "info",
    "sum_overflow": "error",
    "no_valid_pair": "warning",
    "rows_omitted": "warning",
    "first_nonfinite_batch": "warning",
}

N, K = 64, 5


def run(tensors: dict, *specs: str | dict) -> Evaluation:
    return evaluate(tensors, list(specs))


def logits_labels(n: int = N, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, k), torch.randint(0, k, (n,))


# Each trigger evaluates one request that must raise its code, checks what the catalogue says about the
# value (NaN, inf, denominator 0...), and returns (diagnostics, fragments the message must contain).
Trigger = Callable[[], tuple[list[Diagnostic], tuple[str, ...]]]


def probabilities_as_logits():
    z, y = logits_labels()
    out = evaluate({"scores": torch.softmax(z, 1), "labels": y}, [{"name": "cross_entropy", "inputs": {"logits": "scores"}}])
    return out.diagnostics, ("'scores'", "input_kind='probs'")


def log_probs_as_logits():
    z, y = logits_labels()
    out = run({"logits": torch.log_softmax(z, 1), "labels": y}, "cross_entropy")
    return out.diagnostics, ("'logits'", "input_kind='log_probs'")


def nan_or_inf():
    z, y = logits_labels()
    z[0, 0], z[3, 1], z[5, 2] = math.nan, math.inf, -math.inf
    out = run({"logits": z, "labels": y}, "cross_entropy")
    assert math.isnan(out["cross_entropy"].value)
    return out.diagnostics, ("'logits'", "3 NaN or infinite")


def labels_out_of_range():
    z, y = logits_labels()
    y[9] = K
    with pytest.raises(InvalidInput, match=r"\[0, 5\)") as info:
        run({"logits": z, "targets_ids": y}, {"name": "cross_entropy", "inputs": {"labels": "targets_ids"}})
    assert info.value.violations[0].field == "tensors.targets_ids"
    return info.value.diagnostics, ("'targets_ids'", f"label {K}", "flat index 9", "[0, 5)")


def all_ignored():
    z, _ = logits_labels()
    out = run({"logits": z, "labels": torch.full((N,), -100)}, "cross_entropy")
    assert math.isnan(out["cross_entropy"].value)
    assert out["cross_entropy"].denominator == 0
    return out.diagnostics, ("ignored", "NaN", "denominator 0")


def ignored_fraction():
    z, y = logits_labels()
    y[:48] = -100
    out = run({"logits": z, "labels": y}, "cross_entropy")
    assert math.isfinite(out["cross_entropy"].value)
    return out.diagnostics, ("48 of 64", "ignore_index=-100")


def multi_label_targets_with_softmax():
    z, _ = logits_labels()
    q = torch.zeros(N, K)
    q[:, 0] = 1
    q[:3, 2] = 1
    out = run({"logits": z, "target_probs": q}, "cross_entropy")
    return out.diagnostics, ("3 rows", "target_probs", "bce_with_logits")


def class_imbalance():
    y = torch.zeros(1000, dtype=torch.long)
    y[:5] = 1
    out = run({"logits": torch.randn(1000, 2), "labels": y}, "accuracy")
    return out.diagnostics, ("class 1", "5 of 1000", "macro F1")


def ctc_infeasible():
    log_probs = torch.log_softmax(torch.randn(6, 4, 5), 2)
    targets = torch.tensor([[1, 2, 3, 4], [1, 1, 2, 2], [1, 2, 0, 0], [3, 3, 3, 0]])
    # sample 1 needs 4 + 2 repeats = 6 > 5 steps; sample 3 needs 3 + 2 = 5 > 4
    tensors = {
        "log_probs": log_probs,
        "targets": targets,
        "input_lengths": torch.tensor([6, 5, 6, 4]),
        "target_lengths": torch.tensor([4, 4, 2, 3]),
    }
    out = run(tensors, {"name": "ctc", "params": {"reduction": "sum"}})
    assert out["ctc"].value == math.inf
    return out.diagnostics, ("sample indices 1, 3", "input length 5")


def single_class_auroc():
    out = run({"logits": torch.randn(40), "targets": torch.ones(40)}, "auroc")
    assert math.isnan(out["auroc"].value)
    return out.diagnostics, ("1 class", "NaN")


def extreme_temperature():
    e = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    out = run({"query": e, "keys": e}, {"name": "info_nce", "params": {"temperature": 1e-4}})
    return out.diagnostics, ("temperature",)


def top_k_covers_all_classes():
    z, y = logits_labels()
    out = evaluate({"scores": z, "labels": y}, [{"name": "top_k_accuracy", "inputs": {"logits": "scores"}, "params": {"k": K}}])
    assert out["top_k_accuracy"].value == 1.0  # the value stays what it is: every label is among the top K
    return out.diagnostics, ("k=5", "5 classes", "'scores'", "1.0", "pass k < 5")


def precision_loss():
    z, y = logits_labels()
    z = z.half()
    z[2, 3] = -65504.0  # the largest float16 magnitude: anything beyond it is inf
    out = run({"logits": z, "labels": y}, "cross_entropy")
    return out.diagnostics, ("'logits'", "65504", "float32 or bfloat16")


def empty_sequences():
    labels = torch.randint(0, 7, (3, 6))
    labels[1, 1:] = -100  # with shift, labels[:, 0] is never a target: sequence 1 has none
    out = run({"logits": torch.randn(3, 6, 7), "labels": labels}, {"name": "lm_cross_entropy", "params": {"normalization": "sequence"}})
    assert out["lm_cross_entropy"].denominator == 2
    return out.diagnostics, ("1 of 3 sequences",)


def overflow():
    z = torch.tensor([800.0, -800.0, 1.0], dtype=torch.float64)
    out = run({"logits": z, "targets": torch.tensor([0.0, 1.0, 1.0])}, "exponential")
    assert out["exponential"].value == math.inf
    return out.diagnostics, ("overflowed", "2 elements", "inf")


def no_valid_pair():
    out = run({"embeddings": torch.randn(6, 4), "labels": torch.arange(6)}, "supcon")
    return out.diagnostics, ("no positive pair", "counts as a batch")


def binned_estimate():
    out = run({"logits": torch.randn(50), "targets": (torch.arange(50) % 2).float()}, {"name": "auroc", "params": {"bins": 100}})
    return out.diagnostics, ("100-bin", "bins=None")


def sum_overflow():
    z, y = logits_labels()
    out = run({"logits": z, "labels": y, "weights": torch.full((N,), 1e308, dtype=torch.float64)}, "accuracy")
    assert math.isnan(out["accuracy"].value)  # not the 0.0 or NaN of finite / inf, unexplained
    return out.diagnostics, ("overflowed float64", "'weights'", "Scale the weights")


def rows_omitted():
    z, y = logits_labels()
    z[2, 0] = math.nan
    out = evaluate({"logits": z, "labels": y}, ["cross_entropy"], nan_policy="omit")
    assert out["cross_entropy"].denominator == N - 1
    return out.diagnostics, ("dropped 1 of 64 rows", "'logits'")


def first_nonfinite_batch():
    z, y = logits_labels()
    acc = Accumulator(["cross_entropy"])
    acc.add({"logits": z, "labels": y}, request_id="r0")
    z[2, 0] = math.nan
    acc.add({"logits": z, "labels": y}, request_id="r1")
    return acc.result().diagnostics, ("batch 1", "'r1'")


TRIGGERS: dict[str, Trigger] = {
    f.__name__: f
    for f in (
        probabilities_as_logits,
        log_probs_as_logits,
        nan_or_inf,
        labels_out_of_range,
        all_ignored,
        ignored_fraction,
        multi_label_targets_with_softmax,
        class_imbalance,
        ctc_infeasible,
        single_class_auroc,
        extreme_temperature,
        top_k_covers_all_classes,
        precision_loss,
        empty_sequences,
        overflow,
        binned_estimate,
        sum_overflow,
        no_valid_pair,
        rows_omitted,
        first_nonfinite_batch,
    )
}

# Request-level findings (about a tensor, whichever function reads it) carry no function alias.
REQUEST_LEVEL = {"nan_or_inf", "precision_loss", "class_imbalance", "first_nonfinite_batch"}


def test_every_code_has_a_trigger_and_a_pinned_severity():
    assert set(TRIGGERS) == set(CODES)
    assert {code: severity for code, (severity, _) in CODES.items()} == SEVERITY


@pytest.mark.parametrize("code", sorted(CODES))
def test_diagnostic_fires_with_severity_and_actionable_message(code):
    diagnostics, fragments = TRIGGERS[code]()
    found = [d for d in diagnostics if d.code == code]
    assert found, f"{code} not raised; got {[d.code for d in diagnostics]}"
    d = found[0]
    assert d.severity == SEVERITY[code]
    assert d.count == 1
    assert (d.function == "") == (code in REQUEST_LEVEL), d
    for fragment in fragments:
        assert fragment in d.message, f"{code}: {fragment!r} not in {d.message!r}"


def test_precision_loss_and_nan_or_inf_for_float16_overflow():
    # 7e4 does not fit float16: it arrives as inf, which is both a non-finite value and a precision loss.
    z = torch.tensor([[7e4, 1.0, 0.0], [0.5, 0.2, 0.1]]).half()
    out = run({"logits": z, "labels": torch.tensor([0, 1])}, "cross_entropy")
    by_code = {d.code: d for d in out.diagnostics}
    assert set(by_code) == {"nan_or_inf", "precision_loss"}
    assert "1 NaN or infinite" in by_code["nan_or_inf"].message
    assert "overflow" in by_code["precision_loss"].message


def test_precision_loss_only_for_float16():
    z, y = logits_labels()
    z[0, 0] = 70000.0  # fine in float32 and bfloat16
    for dtype in (torch.float32, torch.bfloat16):
        out = run({"logits": z.to(dtype), "labels": y}, "cross_entropy")
        assert "precision_loss" not in [d.code for d in out.diagnostics]


def test_single_class_auroc_multiclass_labels():
    z = torch.randn(30, 3)
    out = run({"logits": z, "labels": torch.full((30,), 2)}, "auroc", "average_precision")
    assert math.isnan(out["auroc"].value) and math.isnan(out["average_precision"].value)
    assert {d.function for d in out.diagnostics if d.code == "single_class_auroc"} == {"auroc", "average_precision"}


def test_labels_out_of_range_through_an_accumulator():
    z, y = logits_labels()
    y[0] = -3
    acc = Accumulator(["cross_entropy"])
    with pytest.raises(InvalidInput) as info:
        acc.add({"logits": z, "labels": y})
    assert info.value.violations[0].field == "tensors.labels"
    assert [d.code for d in info.value.diagnostics] == ["labels_out_of_range"]


def test_clean_data_raises_no_diagnostic():
    """Well-formed random inputs for every registered function, in one request: not a single finding."""
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    specs = []
    for f in all_functions():
        inputs = {}
        for role, value in valid_inputs(f.name, rng, n=48).items():
            tensors[f"{f.name}/{role}"] = value
            inputs[role] = f"{f.name}/{role}"
        specs.append({"name": f.name, "inputs": inputs})
    out = evaluate(tensors, specs)
    assert len(out.results) == len(all_functions())
    assert out.diagnostics == [], [(d.code, d.function, d.message) for d in out.diagnostics]


def test_clean_float16_and_bfloat16_logits_raise_no_diagnostic():
    z, y = logits_labels()
    for dtype in (torch.float16, torch.bfloat16):
        out = run({"logits": (z * 4).to(dtype), "labels": y}, "cross_entropy", "accuracy", "ece", "auroc", "entropy")
        assert out.diagnostics == []


def test_diagnostics_are_counted_in_run_totals():
    """Three batches each raising ignored_fraction: one entry with count 3, the first batch's message."""
    acc = Accumulator(["cross_entropy", "accuracy"])
    messages = []
    for b in range(3):
        z, y = logits_labels()
        y[: 40 + b] = -100
        acc.add({"logits": z, "labels": y})
        messages.append(f"{40 + b} of {N}")
    found = [d for d in acc.result().diagnostics if d.code == "ignored_fraction"]
    assert [(d.function, d.count) for d in found] == [("cross_entropy", 3), ("accuracy", 3)]
    assert all(messages[0] in d.message for d in found)


def test_request_level_diagnostics_are_counted_in_run_totals():
    acc = Accumulator(["cross_entropy"])
    for _ in range(3):
        z, y = logits_labels()
        z[0, 0] = math.nan
        acc.add({"logits": z, "labels": y})
    acc.add(dict(zip(("logits", "labels"), logits_labels(), strict=True)))  # a clean fourth batch adds nothing
    out = acc.result()
    assert [(d.code, d.count) for d in out.diagnostics] == [("nan_or_inf", 3), ("first_nonfinite_batch", 1)]
    assert out.batches == 4


def test_class_imbalance_once_per_request_from_losses_and_metrics():
    y = torch.zeros(1000, dtype=torch.long)
    y[:3] = 1
    out = evaluate({"logits": torch.randn(1000, 2), "labels": y}, ["cross_entropy", "accuracy", "focal"])
    found = [d for d in out.diagnostics if d.code == "class_imbalance"]
    assert len(found) == 1 and found[0].count == 1 and "'labels'" in found[0].message
    binary = evaluate({"logits": torch.randn(1000), "targets": y.float()}, ["bce_with_logits", "auroc"])
    assert [d.code for d in binary.diagnostics].count("class_imbalance") == 1
