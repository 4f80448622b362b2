"""Written-down rules: top_k_accuracy's tie break, and renormalized probability rows.

lossd breaks score ties by the lower class index (as argmax does);
scikit-learn's ``top_k_accuracy_score`` ranks the higher index first.  The
difference is deliberate and documented (ListFunctions, README); tie-free
inputs agree with sklearn exactly.  Probability rows accepted within 1e-3
of summing to 1 are renormalized before use: every function gives the value
of the renormalized rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score

from helpers import assert_close
from lossd.kernels import InvalidInput, evaluate, get_function


def top_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return evaluate({"logits": scores, "labels": labels}, [{"name": "top_k_accuracy", "params": {"k": k}}])["top_k_accuracy"].value


def sklearn_top_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return float(top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k, labels=np.arange(scores.shape[1])))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tie_free_scores_match_sklearn(k: int) -> None:
    scores = torch.randn(200, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (200,))
    assert_close(top_k(scores, labels, k), sklearn_top_k(scores, labels, k), rtol=1e-12, what=f"top_{k}_accuracy")


def test_ties_go_to_the_lower_class_index() -> None:
    # Classes 0 and 1 tie for the top score: at k=1 only class 0 is in the top k.
    scores = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    assert top_k(scores, torch.tensor([0, 0]), 1) == 1.0
    assert top_k(scores, torch.tensor([1, 1]), 1) == 0.0
    assert top_k(scores, torch.tensor([1, 1]), 2) == 1.0
    # Three tied classes at k=2: classes 0 and 1 are in, class 2 is out.
    flat = torch.zeros(3, 3, dtype=torch.float64)
    assert top_k(flat, torch.tensor([0, 1, 2]), 2) == pytest.approx(2 / 3, rel=1e-15)
    # The same rule as accuracy (argmax picks the first maximum).
    accuracy = evaluate({"logits": scores, "labels": torch.tensor([0, 1])}, ["accuracy"])["accuracy"].value
    assert accuracy == top_k(scores, torch.tensor([0, 1]), 1) == 0.5


def test_the_documented_difference_with_sklearn_on_a_tie() -> None:
    """sklearn ranks the higher index first on ties: the opposite answer on the same tie, by design."""
    scores = torch.tensor([[2.0, 2.0, 0.0]], dtype=torch.float64)
    assert top_k(scores, torch.tensor([0]), 1) == 1.0 and sklearn_top_k(scores, torch.tensor([0]), 1) == 0.0
    assert top_k(scores, torch.tensor([1]), 1) == 0.0 and sklearn_top_k(scores, torch.tensor([1]), 1) == 1.0


def test_listing_states_the_rules() -> None:
    summary = get_function("top_k_accuracy").summary
    assert "ties are broken by the lower class index" in summary and "higher index first" in summary
    kind = next(p for p in get_function("ece").params if p.name == "input_kind")
    assert "renormalized before use" in kind.doc


# -- probability rows within the tolerance are renormalized --------------------------------------
PROBS_FUNCTIONS = [
    "cross_entropy",
    "log_loss",
    "brier",
    "entropy",
    "accuracy",
    "ece",
    "ece:scope=classwise",
    "adaptive_ece",
    "reliability_diagram",
]


def _spec(text: str) -> dict:
    name, _, param = text.partition(":")
    params: dict = {"input_kind": "probs"}
    if param:
        key, value = param.split("=")
        params[key] = int(value) if value.isdigit() else value
    return {"name": name, "params": params, "alias": text}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_within_the_tolerance_give_the_values_of_the_renormalized_rows(dtype: torch.dtype) -> None:
    probs = torch.softmax(torch.randn(64, 4, dtype=torch.float64), dim=1)
    scale = 1 + 8e-4 * torch.sign(torch.randn(64, 1, dtype=torch.float64))  # rows sum to 1 ± 8e-4: accepted
    labels = torch.arange(64) % 4
    specs = [_spec(t) for t in PROBS_FUNCTIONS]
    off = evaluate({"logits": (probs * scale).to(dtype), "labels": labels}, specs)
    renormalized = (probs * scale).to(dtype).to(torch.float64)
    renormalized = (renormalized / renormalized.sum(dim=1, keepdim=True)).to(dtype)
    exact = evaluate({"logits": renormalized, "labels": labels}, specs)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for text in PROBS_FUNCTIONS:
        assert_close(off[text].value, exact[text].value, rtol=rtol, atol=1e-9, what=f"{text} on rows off by 8e-4")


def test_rows_beyond_the_tolerance_are_refused() -> None:
    probs = torch.softmax(torch.randn(8, 4, dtype=torch.float64), dim=1) * 1.002
    with pytest.raises(InvalidInput, match="summing to 1 within 1e-3") as info:
        evaluate({"logits": probs, "labels": torch.arange(8) % 4}, [_spec("ece")])
    assert info.value.violations[0].field == "tensors.logits"
