"""``evaluate_stream(..., compute="local", nan_policy=...)``: the asyncio client, the blocking one and the server agree."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import AsyncClient, Client, EvaluationResult

FUNCTIONS = ["cross_entropy", "accuracy"]
BAD_ROW = 3  # of batch 1


def batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    out: list[dict[str, np.ndarray]] = [
        {"logits": rng.standard_normal((16, 5)).astype(np.float32), "labels": rng.integers(0, 5, 16)} for _ in range(3)
    ]
    out[1]["logits"][BAD_ROW, 2] = np.nan
    return out


def reference_without_the_bad_row() -> dict[str, float]:
    """cross_entropy and accuracy by torch over every row but the NaN one (what 'omit' means)."""
    data = batches()
    keep = np.ones(48, bool)
    keep[16 + BAD_ROW] = False
    logits = torch.from_numpy(np.concatenate([b["logits"] for b in data])[keep]).double()
    labels = torch.from_numpy(np.concatenate([b["labels"] for b in data])[keep])
    return {"cross_entropy": float(F.cross_entropy(logits, labels)), "accuracy": float((logits.argmax(1) == labels).double().mean())}


def values(result: EvaluationResult) -> dict[str, float]:
    return {alias: float(r.value) for alias, r in result.items()}


def omitted(result: EvaluationResult) -> list[int]:
    return sorted(d.count for d in result.diagnostics if d.code == "rows_omitted")


async def as_async(items: list[dict[str, np.ndarray]]) -> AsyncIterator[dict[str, np.ndarray]]:
    for item in items:
        yield item


def async_local(address: str, nan_policy: str, *, async_batches: bool = False) -> EvaluationResult:
    async def main() -> EvaluationResult:
        async with AsyncClient(address, timeout=30) as client:
            source = as_async(batches()) if async_batches else batches()
            return await client.evaluate_stream(source, FUNCTIONS, compute="local", nan_policy=nan_policy)

    return asyncio.run(main())


def test_omit_drops_the_same_rows_locally_in_both_clients_and_on_the_server(address: str) -> None:
    with Client(address, timeout=30) as client:
        server = client.evaluate_stream(batches(), FUNCTIONS, nan_policy="omit")
        local = client.evaluate_stream(batches(), FUNCTIONS, compute="local", nan_policy="omit")
    expected = reference_without_the_bad_row()
    assert values(server) == pytest.approx(expected, rel=1e-6)  # float32 logits
    for result in (async_local(address, "omit"), async_local(address, "omit", async_batches=True)):
        assert values(result) == values(local) == values(server)
        assert omitted(result) == omitted(local) == omitted(server) != []
        first = [d.message for d in result.diagnostics if d.code == "first_nonfinite_batch"]
        assert len(first) == 1 and first[0].startswith("batch 1 "), result.diagnostics


def test_raise_names_the_tensor_and_index_locally_in_both_clients_and_on_the_server(address: str) -> None:
    messages = []
    with Client(address, timeout=30) as client:
        for compute in ("server", "local"):
            with pytest.raises(ValueError) as info:
                client.evaluate_stream(batches(), FUNCTIONS, compute=compute, nan_policy="raise")
            messages.append(str(info.value))
    with pytest.raises(ValueError) as async_info:
        async_local(address, "raise")
    messages.append(str(async_info.value))
    flat_index = BAD_ROW * 5 + 2
    for message in messages:
        assert f"tensors.logits: holds NaN at flat index {flat_index} (row {BAD_ROW})" in message, messages
        assert "nan_policy='raise'" in message


def test_propagate_is_the_default_locally_in_both_clients(address: str) -> None:
    with Client(address, timeout=30) as client:
        local = client.evaluate_stream(batches(), FUNCTIONS, compute="local")
    for result in (local, async_local(address, "propagate")):
        assert np.isnan(values(result)["cross_entropy"]), values(result)
