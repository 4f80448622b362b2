"""nan_policy over the wire: unary, run and stream, against torch references on the finite rows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossd.client import Client
from lossd.client.codec import encode_tensor
from lossd.client.errors import InvalidArgumentError, from_rpc_error
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

N, K = 32, 4


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=30) as c:
        yield c


def batch(seed: int, nan_row: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(N, K))
    if nan_row is not None:
        logits[nan_row, 1] = np.nan
    return {"logits": logits, "labels": rng.integers(0, K, N)}


def reference_ce(batches: list[dict[str, np.ndarray]]) -> float:
    z = torch.from_numpy(np.concatenate([b["logits"] for b in batches]))
    y = torch.from_numpy(np.concatenate([b["labels"] for b in batches]))
    rows = torch.isfinite(z).all(1)
    return float(F.cross_entropy(z[rows], y[rows]))


def test_unary_omit_equals_torch_on_the_finite_rows(client: Client) -> None:
    b = batch(0, nan_row=5)
    out = client.evaluate(b, ["cross_entropy"], nan_policy="omit")
    assert out["cross_entropy"].value == pytest.approx(reference_ce([b]), rel=1e-12)
    assert [d.code for d in out.diagnostics] == ["rows_omitted"]
    assert "dropped 1 of 32 rows" in out.diagnostics[0].message


def test_unary_raise_names_the_tensor_and_index(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.evaluate(batch(0, nan_row=5), ["cross_entropy"], nan_policy="raise")
    (violation,) = info.value.violations
    assert violation.field == "tensors.logits"
    assert "holds NaN at flat index 21 (row 5)" in violation.description


def test_unary_propagate_is_the_default(client: Client) -> None:
    out = client.evaluate(batch(0, nan_row=5), ["cross_entropy"])
    assert math.isnan(out["cross_entropy"].value)
    assert [d.code for d in out.diagnostics] == ["nan_or_inf"]


def test_a_bad_policy_name_fails_before_sending(client: Client) -> None:
    with pytest.raises(ValueError, match="nan_policy"):
        client.evaluate(batch(0), ["cross_entropy"], nan_policy="skip")


@pytest.mark.parametrize("policy", ["propagate", "omit"])
def test_run_names_the_first_batch_with_nan(client: Client, policy: str) -> None:
    batches = [batch(1), batch(2), batch(3, nan_row=7), batch(4, nan_row=0)]
    run = client.run(["cross_entropy"], nan_policy=policy)
    for b in batches:
        out = run.update(b)
    first = [d for d in out.diagnostics if d.code == "first_nonfinite_batch"]
    assert len(first) == 1 and first[0].message.startswith("batch 2 (request id '")
    if policy == "omit":
        assert out["cross_entropy"].value == pytest.approx(reference_ce(batches), rel=1e-12)
    else:
        assert math.isnan(out["cross_entropy"].value)


def test_run_raise_refuses_the_batch_and_keeps_the_totals(client: Client) -> None:
    run = client.run(["cross_entropy"], nan_policy="raise")
    run.update(batch(1))
    with pytest.raises(InvalidArgumentError):
        run.update(batch(2, nan_row=3))
    run.update(batch(3))
    assert run.result()["cross_entropy"].value == pytest.approx(reference_ce([batch(1), batch(3)]), rel=1e-12)


def test_stream_names_the_first_batch_with_nan_and_omits(client: Client) -> None:
    batches = [batch(5), batch(6, nan_row=2), batch(7, nan_row=9)]
    out = client.evaluate_stream(batches, ["cross_entropy"], nan_policy="omit", request_id="stream-1")
    assert out["cross_entropy"].value == pytest.approx(reference_ce(batches), rel=1e-12)
    message = next(d.message for d in out.diagnostics if d.code == "first_nonfinite_batch")
    assert message.startswith("batch 1 (request id 'stream-1') first brought NaN")
    with pytest.raises(InvalidArgumentError) as info:
        client.evaluate_stream(batches, ["cross_entropy"], nan_policy="raise", request_id="stream-2")
    (violation,) = info.value.violations
    assert violation.field == "tensors.logits"
    assert violation.description.startswith("holds NaN at flat index 9 (row 2); nan_policy='raise'")
    assert violation.description.endswith("; in batch 1 (request id 'stream-2')")


def test_raw_stream_raise_names_the_batch_of_a_batch_sent_in_parts(address: str) -> None:
    """Parts sharing a batch_id are one batch: a NaN in the second part of the second batch is in batch 1."""
    second = batch(9, nan_row=20)
    tensors = [batch(8), {k: v[:16] for k, v in second.items()}, {k: v[16:] for k, v in second.items()}]
    messages = [pb.EvaluateRequest(tensors={k: encode_tensor(v, k) for k, v in t.items()}) for t in tensors]
    messages[0].functions.add(name="cross_entropy")
    messages[0].request_id, messages[0].nan_policy = "raw-3", pb.NAN_POLICY_RAISE
    messages[1].batch_id = messages[2].batch_id = "b1"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).EvaluateStream(iter(messages), timeout=30)
    error = from_rpc_error(info.value)  # type: ignore[arg-type]
    assert isinstance(error, InvalidArgumentError)
    (violation,) = error.violations
    assert violation.field == "tensors.logits"
    assert violation.description.endswith("; in batch 1 (batch_id 'b1', request id 'raw-3')"), violation.description


def test_gateway_body_carries_nan_policy() -> None:
    from lossd.server.gateway.models import EvaluateBody, request_to_proto

    tensors = {
        "logits": {"dtype": "float32", "shape": [1, 2], "data": [[0.0, "nan"]]},
        "labels": {"dtype": "int64", "shape": [1], "data": [0]},
    }
    body = EvaluateBody.model_validate({"tensors": tensors, "functions": ["cross_entropy"], "nan_policy": "omit"})
    assert request_to_proto(body).nan_policy == pb.NAN_POLICY_OMIT
    default = EvaluateBody.model_validate({"tensors": tensors, "functions": ["cross_entropy"]})
    assert request_to_proto(default).nan_policy == pb.NAN_POLICY_PROPAGATE
