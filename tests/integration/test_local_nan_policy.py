"""``evaluate_stream(..., compute="local", nan_policy=...)``: the asyncio client, the blocking one and the server agree."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import AsyncClient, Client, EvaluationResult
from lossd.client.errors import FieldViolation, InvalidArgumentError

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


def async_local(address: str, nan_policy: str, *, async_batches: bool = False, request_id: str | None = None) -> EvaluationResult:
    async def main() -> EvaluationResult:
        async with AsyncClient(address, timeout=30) as client:
            source = as_async(batches()) if async_batches else batches()
            return await client.evaluate_stream(source, FUNCTIONS, compute="local", nan_policy=nan_policy, request_id=request_id)

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


def test_raise_names_the_tensor_index_and_batch_locally_in_both_clients_and_on_the_server(address: str) -> None:
    errors: list[InvalidArgumentError] = []
    with Client(address, timeout=30) as client:
        for compute in ("server", "local"):
            with pytest.raises(InvalidArgumentError) as info:
                client.evaluate_stream(batches(), FUNCTIONS, compute=compute, nan_policy="raise", request_id="nan-stream")
            errors.append(info.value)
    with pytest.raises(InvalidArgumentError) as async_info:
        async_local(address, "raise", request_id="nan-stream")
    errors.append(async_info.value)
    flat_index = BAD_ROW * 5 + 2
    expected = (
        f"holds NaN at flat index {flat_index} (row {BAD_ROW}); nan_policy='raise' refuses NaN and infinite values "
        "(nan_policy='omit' drops such rows, 'propagate' computes NaN values); in batch 1 (request id 'nan-stream')"
    )
    for error in errors:
        assert error.violations == [FieldViolation("tensors.logits", expected)], errors
        assert str(error) == f"INVALID_ARGUMENT: tensors.logits: {expected}"


@pytest.mark.parametrize("compute", ["server", "local"])
def test_a_run_names_the_batch_that_raised_and_keeps_going(address: str, compute: str) -> None:
    data = batches()
    with Client(address, timeout=30) as client:
        run = client.run(FUNCTIONS, compute=compute, nan_policy="raise")
        run.update(data[0])
        with pytest.raises(InvalidArgumentError) as info:
            run.update(data[1])
        run.update(data[2])
        totals = values(run.result())
    (violation,) = info.value.violations
    assert violation.field == "tensors.logits"
    assert f"(row {BAD_ROW}); nan_policy='raise'" in violation.description
    assert violation.description.endswith("; in batch 1" if compute == "local" else "')")
    assert "; in batch 1 (request id '" in violation.description or compute == "local"
    both = [data[0], data[2]]
    logits = torch.from_numpy(np.concatenate([b["logits"] for b in both])).double()
    labels = torch.from_numpy(np.concatenate([b["labels"] for b in both]))
    assert totals["cross_entropy"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)


def test_a_local_stream_carries_its_request_id(address: str) -> None:
    with Client(address, timeout=30) as client:
        local = client.evaluate_stream(batches(), FUNCTIONS, compute="local", nan_policy="omit", request_id="local-7")
    for result in (local, async_local(address, "omit", request_id="local-7")):
        assert result.response.request_id == "local-7"
        (first,) = [d.message for d in result.diagnostics if d.code == "first_nonfinite_batch"]
        assert first.startswith("batch 1 (request id 'local-7') first brought NaN"), first


def test_propagate_is_the_default_locally_in_both_clients(address: str) -> None:
    with Client(address, timeout=30) as client:
        local = client.evaluate_stream(batches(), FUNCTIONS, compute="local")
    for result in (local, async_local(address, "propagate")):
        assert np.isnan(values(result)["cross_entropy"]), values(result)
