"""Hand-serialized evaluate requests parse to exactly the message protobuf would build."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lossd.client.messages import evaluate_request
from lossd.client.specs import specs_to_proto
from lossd.client.wire import serialize_evaluate_request
from lossd.v1 import lossd_pb2 as pb

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.random.default_rng(0).standard_normal((5, 1, 3)).astype(np.float16),
    np.linspace(-3, 3, 7).astype(ml_dtypes.bfloat16),
    np.array(2.5),  # a scalar: shape []
    np.zeros((0, 4), dtype=np.float64),
    np.arange(300, dtype=np.int64) - 150,
    np.array([1, 2], dtype=">i4"),  # big-endian: sent little-endian
    np.array([True, False, True]),
    np.arange(200, dtype=np.uint8).reshape(10, 20)[:, ::2],  # not contiguous
    np.ones((129, 3), dtype=np.int32),  # shape dims needing 2-byte varints
]


@pytest.mark.parametrize("index", range(len(ARRAYS)))
def test_single_tensor_matches_protobuf(index: int) -> None:
    arrays = {"x": ARRAYS[index]}
    expected = evaluate_request(arrays, specs_to_proto(["mse"]), tags=pb.Tags(model="m"), return_state=True, request_id="r")
    rest = evaluate_request({}, specs_to_proto(["mse"]), tags=pb.Tags(model="m"), return_state=True, request_id="r")
    assert pb.EvaluateRequest.FromString(serialize_evaluate_request(arrays, rest)) == expected


def test_many_tensors_and_unicode_names() -> None:
    arrays = {f"t{i}-é": a for i, a in enumerate(ARRAYS)}
    rest = evaluate_request({}, specs_to_proto(["cross_entropy", "ece:n_bins=15"]), batch_id="b")
    expected = evaluate_request(arrays, specs_to_proto(["cross_entropy", "ece:n_bins=15"]), batch_id="b")
    assert pb.EvaluateRequest.FromString(serialize_evaluate_request(arrays, rest)) == expected


def test_large_tensor_round_trips() -> None:
    big = np.random.default_rng(1).standard_normal((512, 1024), dtype=np.float32)  # > 2 MB: 4-byte length varints
    parsed = pb.EvaluateRequest.FromString(serialize_evaluate_request({"logits": big}, pb.EvaluateRequest()))
    assert np.array_equal(np.frombuffer(parsed.tensors["logits"].data, dtype=np.float32).reshape(512, 1024), big)


def test_rest_with_tensors_is_refused() -> None:
    with pytest.raises(ValueError, match="must not carry tensors"):
        serialize_evaluate_request({}, evaluate_request({"x": np.zeros(1)}, ()))


def test_the_varint_table_is_the_protobuf_encoding() -> None:
    from google.protobuf.internal.encoder import _VarintBytes

    from lossd.client import wire

    for value in [*range(1 << 14), 1 << 14, 300_000, 1 << 35]:
        assert wire._varint(value) == _VarintBytes(value), value
