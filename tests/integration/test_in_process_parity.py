"""lossd.kernels in process returns bit for bit what the service returns (DESIGN.md's promise)."""

from __future__ import annotations

import numpy as np
import torch

from lossd.client import Client
from lossd.kernels import evaluate

FUNCTIONS = ["cross_entropy", "accuracy", "ece", "entropy", "brier", {"name": "focal", "params": {"gamma": 1.5}}, "reliability_diagram"]


def test_service_values_equal_in_process_values_exactly(address: str) -> None:
    rng = np.random.default_rng(11)
    tensors = {"logits": (rng.standard_normal((257, 7)) * 3).astype(np.float32), "labels": rng.integers(0, 7, 257)}
    bf16 = {"logits": torch.from_numpy(tensors["logits"]).bfloat16(), "labels": tensors["labels"]}
    with Client(address) as client:
        for batch in (tensors, bf16):
            remote = client.evaluate(batch, FUNCTIONS)
            local = evaluate(batch, FUNCTIONS)
            for alias, result in local.results.items():
                assert remote[alias].values == result.values, alias
                for name, array in result.tensors.items():
                    np.testing.assert_array_equal(remote[alias].tensors[name], array)
