"""top_k_accuracy with k >= K: the value stays 1.0 and the top_k_covers_all_classes warning says why it means nothing.

scikit-learn's ``top_k_accuracy_score`` warns in the same case ("'k' (K) greater
than or equal to 'n_classes' (K) will result in a perfect score and is therefore
meaningless"); lossd reports it as a diagnostic of the function that raised it.
"""

from __future__ import annotations

import pytest
import torch

from lossd.kernels import CODES, Accumulator, evaluate, get_function

CODE = "top_k_covers_all_classes"


def top_k(tensors: dict, k: int, **spec):
    out = evaluate(tensors, [{"name": "top_k_accuracy", "params": {"k": k}, **spec}])
    return out[spec.get("alias", "top_k_accuracy")].value, [d for d in out.diagnostics if d.code == CODE]


def logits_labels(n: int = 40, classes: int = 6, *extra: int) -> dict:
    return {"logits": torch.randn(n, classes, *extra), "labels": torch.randint(0, classes, (n, *extra))}


def test_the_code_is_a_registered_warning():
    severity, meaning = CODES[CODE]
    assert severity == "warning" and "k >= K" in meaning


@pytest.mark.parametrize("k", [6, 7, 50])
def test_k_at_or_above_the_class_count_warns_and_keeps_the_perfect_score(k):
    value, found = top_k(logits_labels(), k)
    assert value == 1.0
    assert len(found) == 1
    d = found[0]
    assert (d.severity, d.function, d.count) == ("warning", "top_k_accuracy", 1)
    for fragment in (f"k={k}", "6 classes", "'logits'", "1.0", "pass k < 6"):
        assert fragment in d.message, f"{fragment!r} not in {d.message!r}"


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_below_the_class_count_raises_nothing(k):
    out = evaluate(logits_labels(), [{"name": "top_k_accuracy", "params": {"k": k}}])
    assert out.diagnostics == []


def test_the_default_k_of_five_warns_for_four_classes():
    value, found = top_k(logits_labels(classes=4), get_function("top_k_accuracy").params[0].default)
    assert value == 1.0 and len(found) == 1 and "k=5 >= the 4 classes" in found[0].message


def test_names_the_tensor_and_alias_as_sent():
    tensors = {"scores": torch.randn(10, 3), "labels": torch.arange(10) % 3}
    _, found = top_k(tensors, 3, inputs={"logits": "scores"}, alias="top3")
    assert [(d.function, "'scores'" in d.message) for d in found] == [("top3", True)]


def test_spatial_logits_and_ignored_labels():
    tensors = logits_labels(8, 3, 5)
    tensors["labels"][:, 0] = -100
    value, found = top_k(tensors, 3)
    assert value == 1.0 and len(found) == 1  # every valid element is a hit; ignored ones do not count


def test_counted_once_per_batch_in_run_totals():
    acc = Accumulator([{"name": "top_k_accuracy", "params": {"k": 9}}])
    for _ in range(3):
        acc.add(logits_labels())
    out = acc.result()
    assert out["top_k_accuracy"].value == 1.0
    assert [(d.code, d.count) for d in out.diagnostics] == [(CODE, 3)]


def test_other_functions_in_the_request_are_unaffected():
    tensors = logits_labels()
    out = evaluate(
        tensors,
        ["accuracy", {"name": "top_k_accuracy", "params": {"k": 6}}, {"name": "top_k_accuracy", "alias": "top2", "params": {"k": 2}}],
    )
    assert [(d.code, d.function) for d in out.diagnostics] == [(CODE, "top_k_accuracy")]
