"""Monitoring behind a real server: wire sizes, role-mapped calibration, skips and failed streams."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from replica import Replica

from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def replica() -> Iterator[Replica]:
    r = Replica().start()
    yield r
    r.stop()


def _value(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_sizes_are_wire_bytes_and_mapped_roles_are_calibrated(replica: Replica) -> None:
    rng = np.random.default_rng(0)
    tensors = {"student": rng.standard_normal((300, 6)).astype(np.float32), "gold": rng.integers(0, 6, 300)}
    request = pb.EvaluateRequest(
        tensors={k: encode_tensor(v, k) for k, v in tensors.items()},
        functions=[spec_to_proto({"name": "cross_entropy", "inputs": {"logits": "student", "labels": "gold"}})],
        tags=pb.Tags(model="sized"),
    )
    with grpc.insecure_channel(replica.grpc_address) as channel:
        response = pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=60)
    text = httpx.get(f"{replica.url}/metrics", timeout=60).text  # a scrape sees every response sent before it
    method = '{grpc_method="Evaluate",grpc_service="lossd.v1.LossService"}'
    assert _value(text, f"lossd_grpc_request_size_bytes_sum{method}") == request.ByteSize()
    assert _value(text, f"lossd_grpc_response_size_bytes_sum{method}") == response.ByteSize()
    assert _value(text, "lossd_calibration_predictions_total{bin_upper=") >= 300
    assert (
        sum(float(line.split()[-1]) for line in text.splitlines() if "calibration_predictions_total" in line and 'model="sized"' in line)
        == 300
    )


def test_skips_are_counted_and_a_failed_stream_exports_nothing(replica: Replica) -> None:
    batch = {"predictions": np.zeros(5, np.float32), "targets": np.ones(5, np.float32)}
    with grpc.insecure_channel(replica.grpc_address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        stub.Evaluate(
            pb.EvaluateRequest(tensors={k: encode_tensor(v, k) for k, v in batch.items()}, functions=[spec_to_proto("mse")]), timeout=60
        )
        good = {"logits": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.int64)}
        bad = {"logits": np.zeros((4, 3), np.float32), "labels": np.full(4, 7, np.int64)}  # out of range: the stream fails
        messages = [
            pb.EvaluateRequest(
                tensors={k: encode_tensor(v, k) for k, v in good.items()},
                functions=[spec_to_proto("cross_entropy")],
                tags=pb.Tags(model="broken"),
            ),
            pb.EvaluateRequest(tensors={k: encode_tensor(v, k) for k, v in bad.items()}),
        ]
        with pytest.raises(grpc.RpcError) as failed:
            stub.EvaluateStream(iter(messages), timeout=60)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = httpx.get(f"{replica.url}/metrics", timeout=60).text
    assert 'lossd_calibration_skipped_total{reason="no_class_scores"} 1.0' in text
    assert 'model="broken"' not in text
    assert replica.monitoring is not None and len(replica.monitoring._streams) == 0
