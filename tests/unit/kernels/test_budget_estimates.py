"""Request budgets: per-function estimates from shapes and parameters, refused before computing."""

from __future__ import annotations

import numpy as np
import pytest

from lossd.kernels import Accumulator, evaluate
from lossd.kernels.budget import Budget, calibration_bins, chunked, confusion, moe_routing, rank_histogram
from lossd.kernels.errors import RequestBudgetExceeded

MiB = 1 << 20


def test_estimates_grow_with_the_declared_state() -> None:
    shapes = {"logits": (1, 4096), "labels": (1,)}
    assert confusion(shapes, {}).memory >= 3 * 4096 * 4096 * 8
    assert confusion(shapes, {}, returns_matrix=True).response == 4096 * 4096 * 8
    assert rank_histogram({"logits": (8, 64)}, {"bins": 100_000}).memory >= 64 * 100_000 * 2 * 8
    assert calibration_bins({"logits": (1, 1000)}, {"scope": "classwise", "n_bins": 100}).response == 1000 * 100 * 3 * 8
    assert calibration_bins({"logits": (1, 1000)}, {"scope": "top_label", "n_bins": 100}).response == 100 * 3 * 8
    assert moe_routing({"router_logits": (1, 8000)}, {"top_k": 8000}).memory >= 8000 * 8000 * 8
    assert chunked({"predictions": (10,), "targets": (10,)}, {"reduction": "none"}).response == 10 * 2 * 8


def test_evaluate_refuses_over_the_budget_before_computing_and_names_the_setting() -> None:
    rng = np.random.default_rng(0)
    tensors = {"logits": rng.standard_normal((1, 4096)).astype(np.float32), "labels": np.array([3])}
    specs = [{"name": "confusion_matrix", "alias": f"cm{i}"} for i in range(32)]
    with pytest.raises(RequestBudgetExceeded, match=r"max_request_memory_bytes.*LOSSD_MAX_REQUEST_MEMORY_BYTES") as info:
        evaluate(tensors, specs, budget=Budget(1024 * MiB, None))
    assert info.value.setting == "max_request_memory_bytes" and "largest: cm" in str(info.value)
    with pytest.raises(RequestBudgetExceeded, match="max_message_bytes") as response:
        evaluate(tensors, specs[:8], budget=Budget(None, 512 * MiB))  # 8 × 128 MiB matrices in the response
    assert response.value.reason == "REQUEST_BUDGET_EXCEEDED"
    small = evaluate({"logits": tensors["logits"][:, :4], "labels": np.array([1])}, ["confusion_matrix"], budget=Budget(64 * MiB, 64 * MiB))
    assert small["confusion_matrix"].tensors["value"].shape == (4, 4)


def test_an_accumulator_checks_every_batch() -> None:
    acc = Accumulator([{"name": "ece", "params": {"scope": "classwise", "n_bins": 1000}}], budget=Budget(64 * MiB, None))
    rng = np.random.default_rng(0)
    acc.add({"logits": rng.standard_normal((4, 10)).astype(np.float32), "labels": np.array([0, 1, 2, 3])})
    with pytest.raises(RequestBudgetExceeded, match="ece"):
        acc.add({"logits": rng.standard_normal((1, 10_000)).astype(np.float32), "labels": np.array([0])})
    assert acc.batches == 1  # the refused batch counted for nothing
