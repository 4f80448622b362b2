"""EvaluateRequest parsed with its tensors' data left in the received bytes: the same message as protobuf's, no copy."""

from __future__ import annotations

import contextvars

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from lossd.client.codec import encode_tensor
from lossd.kernels.errors import InvalidInput
from lossd.server import wire_request
from lossd.server.convert import decode_request_tensors
from lossd.server.wire_request import lenient, parse_evaluate_request, release_tensor_data, take_tensor_data_views, undecodable
from lossd.v1 import lossd_pb2 as pb

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def scan_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan runs on messages of any size here: the cases below are small to be readable."""
    monkeypatch.setattr(wire_request, "ZERO_COPY_MIN_BYTES", 0)


def _request(**tensors: object) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        tensors={name: encode_tensor(value, name) for name, value in tensors.items()},
        functions=[pb.FunctionSpec(name="cross_entropy", alias="ce")],
        tags=pb.Tags(model="m"),
        request_id="r1",
        batch_id="b7",
        nan_policy=pb.NAN_POLICY_OMIT,
    )


def _reassembled(raw: bytes) -> pb.EvaluateRequest:
    """What parse_evaluate_request read, with each tensor's data put back from its view."""
    message = parse_evaluate_request(raw)
    views = take_tensor_data_views(message.tensors)
    assert views is not None
    whole = pb.EvaluateRequest()
    whole.CopyFrom(message)
    for name, view in views.items():
        assert not message.tensors[name].data  # left in raw, not copied into the message
        whole.tensors[name].data = bytes(view)
    return whole


def test_the_message_is_protobufs_own() -> None:
    rng = np.random.default_rng(0)
    request = _request(logits=rng.standard_normal((6, 5), dtype=np.float32), labels=np.arange(6), empty=np.zeros((0, 3), np.float32))
    request.prior_states["ce"].function = "cross_entropy"
    request.prior_states["ce"].fields["sum"].CopyFrom(encode_tensor(np.array([1.5])))
    shared = request.tensors["shm"]
    shared.dtype, shared.shape[:] = pb.FLOAT32, [2]
    shared.shared_memory.name, shared.shared_memory.byte_size = "lossd_x", 8
    raw = request.SerializeToString()
    assert _reassembled(raw) == pb.EvaluateRequest.FromString(raw)


def test_protobuf_merge_rules_are_kept() -> None:
    # Concatenated messages merge: a later map entry replaces an earlier one; the last data of a tensor wins.
    first = _request(logits=np.ones((2, 2), np.float32), labels=np.arange(2)).SerializeToString()
    second = _request(logits=np.full((3, 2), 7, np.float32)).SerializeToString()
    tensor_twice = pb.Tensor(data=b"\x01\x02").SerializeToString() + encode_tensor(np.arange(4, dtype=np.int32)).SerializeToString()
    entry = b"\n\x01t" + b"\x12" + bytes([len(tensor_twice)]) + tensor_twice
    dropped_data = b"\n" + bytes([len(b"\n\x01u\x12\x04\x1a\x02ab")]) + b"\n\x01u\x12\x04\x1a\x02ab"
    no_data_after = b"\n\x05\n\x01u\x12\x00"  # entry "u" again, without data: the map holds the later one
    raw = first + second + b"\n" + bytes([len(entry)]) + entry + dropped_data + no_data_after
    expected = pb.EvaluateRequest.FromString(raw)
    assert expected.tensors["t"].data == np.arange(4, dtype=np.int32).tobytes() and not expected.tensors["u"].data
    assert _reassembled(raw) == expected


@pytest.mark.parametrize("raw", [b"\n\x05\n\x01x", b"\x0a\xff\xff\xff\xff\x0f", b"\n\x03\n\x01\xff", b"\x08"])
def test_bytes_that_do_not_parse_raise_protobufs_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.EvaluateRequest.FromString(raw)
    with pytest.raises(DecodeError):
        parse_evaluate_request(raw)
    assert take_tensor_data_views(pb.EvaluateRequest().tensors) is None


def test_decoded_tensors_are_views_into_the_received_bytes() -> None:
    rng = np.random.default_rng(1)
    logits, labels = rng.standard_normal((64, 33), dtype=np.float32), rng.integers(0, 33, 64)
    raw = _request(logits=logits, labels=labels).SerializeToString()
    message = parse_evaluate_request(raw)
    out = decode_request_tensors(message.tensors, CPU)
    np.testing.assert_array_equal(out["logits"].numpy(), logits)
    np.testing.assert_array_equal(out["labels"].numpy(), labels)
    start = np.frombuffer(raw, np.uint8).ctypes.data
    for tensor in out.values():  # inside raw: no copy was made
        assert start <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= start + len(raw)


def test_another_map_is_read_the_generated_way() -> None:
    parse_evaluate_request(_request(logits=np.zeros((2, 2), np.float32)).SerializeToString())
    other = _request(logits=np.full((2, 3), 4, np.float32))
    assert take_tensor_data_views(other.tensors) is None
    np.testing.assert_array_equal(decode_request_tensors(other.tensors, CPU)["logits"].numpy(), np.full((2, 3), 4, np.float32))


def test_the_views_are_handed_over_once() -> None:
    # asyncio copies the context into each timer it schedules (a stream's read timeout): once taken, no copy
    # made before holds the request's bytes; a second decode of the same map would read empty data fields.
    message = parse_evaluate_request(_request(logits=np.ones((2, 3), np.float32)).SerializeToString())
    copied = contextvars.copy_context()
    decode_request_tensors(message.tensors, CPU)
    assert copied.run(lambda: wire_request._latest.get()).views is None  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="already taken"):
        decode_request_tensors(message.tensors, CPU)


def test_a_call_that_ends_undecoded_lets_go_of_its_views() -> None:
    message = parse_evaluate_request(_request(logits=np.ones((2, 3), np.float32)).SerializeToString())
    copied = contextvars.copy_context()
    release_tensor_data()
    assert copied.run(lambda: wire_request._latest.get()).views is None  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="already taken"):
        take_tensor_data_views(message.tensors)


def test_errors_name_the_tensor_as_before() -> None:
    request = _request(logits=np.zeros((2, 3), np.float32))
    request.tensors["logits"].shape[:] = [2, 4]
    message = parse_evaluate_request(request.SerializeToString())
    with pytest.raises(InvalidInput) as error:
        decode_request_tensors(message.tensors, CPU)
    (violation,) = error.value.violations
    assert violation.field == "tensors.logits"
    assert violation.description == "byte length 24 does not match dtype float32 × shape [2, 4] (expected 32 bytes)"


def test_data_beside_a_shared_memory_region_is_still_refused() -> None:
    request = _request(x=np.zeros(2, np.float32))
    request.tensors["x"].shared_memory.name = "lossd_x"
    message = parse_evaluate_request(request.SerializeToString())
    with pytest.raises(InvalidInput) as error:
        decode_request_tensors(message.tensors, CPU, allow_shared_memory=True)
    assert error.value.violations[0].field == "tensors.x.data"


def test_small_requests_are_parsed_the_generated_way(monkeypatch: pytest.MonkeyPatch) -> None:
    # Below the threshold the Python scan would cost more than the copies it saves.
    monkeypatch.setattr(wire_request, "ZERO_COPY_MIN_BYTES", 1 << 16)
    small = _request(logits=np.ones((4, 3), np.float32)).SerializeToString()
    message = parse_evaluate_request(small)
    assert message.tensors["logits"].data and take_tensor_data_views(message.tensors) is None
    large = _request(logits=np.ones((128, 128), np.float32)).SerializeToString()
    message = parse_evaluate_request(large)
    assert not message.tensors["logits"].data and take_tensor_data_views(message.tensors) is not None


def test_bytes_that_do_not_parse_become_an_empty_message_and_a_noted_violation() -> None:
    parse = lenient(parse_evaluate_request, pb.EvaluateRequest)

    def call(data: bytes) -> tuple[pb.EvaluateRequest, tuple[str, str] | None]:
        return parse(data), undecodable()

    good = pb.EvaluateRequest(request_id="r").SerializeToString()
    request, noted = contextvars.copy_context().run(call, good)
    assert request.request_id == "r" and noted is None
    request, noted = contextvars.copy_context().run(call, b"\xff\xff\xff")  # each call: its own context, as a call's task
    assert request == pb.EvaluateRequest() and noted is not None
    assert noted[0] == "request" and "expected a serialized lossd.v1.EvaluateRequest, got bytes that do not parse" in noted[1]
    assert undecodable() is None  # noted in the call's context only
