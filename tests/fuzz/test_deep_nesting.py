"""Deeply nested requests against a real ``lossd serve`` (monitoring on, as deployed): INVALID_ARGUMENT, no stderr noise.

A JSON nesting that reaches Python's recursion limit (``json.loads`` of
"[" * 5000) let a garbage collection at that depth fail in the finalizers of
async generators: "Exception ignored ... RecursionError" on the server's
stderr during the 10^6 fuzz. A params Struct nested past protobuf's 100
levels fails to parse, which the monitored server answered UNKNOWN.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from grpc_fuzz import start_server
from grpc_status import rpc_status

from lossd.client.codec import encode_tensor
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc


def _length_delimited(number: int, body: bytes) -> bytes:
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(body)) + body


def nested_params_request(depth: int) -> bytes:
    """An mse EvaluateRequest whose params.reduction is a Struct nested ``depth`` deep, encoded by hand.

    (protobuf itself cannot build or serialize one nested past its limit.)"""
    value = b"\x11" + np.float64(1.0).tobytes()  # Value.number_value
    for _ in range(depth):  # Value.struct_value (5) = Struct{fields (1) = {"k": value}}
        value = _length_delimited(5, _length_delimited(1, _length_delimited(1, b"k") + _length_delimited(2, value)))
    params = _length_delimited(1, _length_delimited(1, b"reduction") + _length_delimited(2, value))
    spec = pb.FunctionSpec(name="mse").SerializeToString() + _length_delimited(pb.FunctionSpec.PARAMS_FIELD_NUMBER, params)
    request = pb.EvaluateRequest()
    for name in ("predictions", "targets"):
        request.tensors[name].CopyFrom(encode_tensor(np.zeros(4), name))
    return request.SerializeToString() + _length_delimited(pb.EvaluateRequest.FUNCTIONS_FIELD_NUMBER, spec)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[grpc.Channel, Path]]:
    log = Path(tempfile.mkdtemp(prefix="lossd-nesting-")) / "server.log"
    process, address = start_server(log)
    try:
        with grpc.insecure_channel(address) as channel:
            yield channel, log
    finally:
        process.terminate()
        process.wait(30)


def violation(call: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    status = rpc_status.from_call(call)
    assert status is not None, call
    from google.rpc import error_details_pb2

    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return call.code(), bad.field_violations[0].field, bad.field_violations[0].description


def refused(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str, str]:
    call = channel.unary_unary(f"/lossd.v1.LossService/{method}")
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=30)
    return violation(info.value)  # type: ignore[arg-type]


@pytest.mark.parametrize("depth", [40, 10_000])
def test_params_nested_past_protobufs_limit_is_invalid_argument_naming_params(served: tuple[grpc.Channel, Path], depth: int) -> None:
    code, field, description = refused(served[0], "Evaluate", nested_params_request(depth))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "functions.params")
    assert "nested at most about 30 levels" in description


def test_params_nested_within_protobufs_limit_are_checked_by_name(served: tuple[grpc.Channel, Path]) -> None:
    code, field, description = refused(served[0], "Evaluate", nested_params_request(20))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "functions[0].params.reduction")
    assert "expected a string" in description


@pytest.mark.parametrize("depth", [33, 5000, 60_000])
def test_state_params_json_nested_deep_is_refused_before_parsing(served: tuple[grpc.Channel, Path], depth: int) -> None:
    state = pb.State(function="mse", version=1, params_json="[" * depth)
    finalize = pb.FinalizeRequest(states=[pb.NamedState(alias="mse", state=state)]).SerializeToString()
    code, field, description = refused(served[0], "Finalize", finalize)
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "states[0].state.params_json")
    assert "nested at most 32 levels" in description or depth > 64 * 1024, description


def test_bytes_that_do_not_parse_are_invalid_argument_under_monitoring(served: tuple[grpc.Channel, Path]) -> None:
    for method, message in (("Evaluate", "lossd.v1.EvaluateRequest"), ("Finalize", "lossd.v1.FinalizeRequest")):
        code, field, description = refused(served[0], method, b"\xff\xff\xff")
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "request") and message in description


def test_zz_the_server_printed_nothing_but_its_banner(served: tuple[grpc.Channel, Path]) -> None:
    channel, log = served
    stub = pb_grpc.LossServiceStub(channel)
    stub.ListFunctions(pb.ListFunctionsRequest(), timeout=30)  # still serving
    lines = [line for line in log.read_text().splitlines() if not line.startswith("lossd serving")]
    assert lines == []
