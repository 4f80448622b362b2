"""Hostile requests over raw gRPC (lossd.v1 messages built by hand, bypassing the client's checks).

Each class of request the fuzzing of the service turned into INTERNAL is
answered INVALID_ARGUMENT with a google.rpc.BadRequest field violation that
names the field at fault, and the server keeps serving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from lossd.client.codec import encode_tensor
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

N, K = 8, 4


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.LossServiceStub(channel)


def batch() -> dict[str, pb.Tensor]:
    rng = np.random.default_rng(0)
    return {
        "logits": encode_tensor(rng.standard_normal((N, K)).astype(np.float32), "logits"),
        "labels": encode_tensor(np.arange(N) % K, "labels"),
    }


def spec(name: str, params: dict[str, Any] | None = None, alias: str = "") -> pb.FunctionSpec:
    s = pb.FunctionSpec(name=name, alias=alias)
    for key, value in (params or {}).items():  # Struct.update cannot hold NaN/Infinity in lists: set them by hand
        s.params.fields[key].CopyFrom(_value(value))
    return s


def _value(value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if isinstance(value, list):
        v.list_value.values.extend(_value(x) for x in value)
    elif isinstance(value, float):
        v.number_value = value
    else:
        v.string_value = value
    return v


def rejected(call: Any, request: Any, code: int = code_pb2.INVALID_ARGUMENT) -> tuple[str, dict[str, str]]:
    """Call, expect the status ``code``; return its message and {field: description} of its violations."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    status = rpc_status.from_call(info.value)
    assert status is not None, f"no rich status: {info.value}"
    assert status.code == code, f"expected {code_pb2.Code.Name(code)}, got {code_pb2.Code.Name(status.code)}: {status.message}"
    violations: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations.update({v.field: v.description for v in bad.field_violations})
    assert "Traceback" not in status.message and "internal error" not in status.message
    return status.message, violations


def expect_violation(call: Any, request: Any, field: str, *fragments: str) -> str:
    message, violations = rejected(call, request)
    assert field in violations, f"expected a violation of {field}, got {violations}"
    for fragment in fragments:
        assert fragment in violations[field], f"{field}: {fragment!r} not in {violations[field]!r}"
    return violations[field]


def state_of(stub: pb_grpc.LossServiceStub, name: str, tensors: dict[str, pb.Tensor] | None = None) -> pb.State:
    response = stub.Evaluate(pb.EvaluateRequest(tensors=tensors or batch(), functions=[spec(name)], return_state=True), timeout=30)
    state: pb.State = response.results[0].state
    return state


# -- non-finite parameters ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_param_is_refused(stub: pb_grpc.LossServiceStub, bad: float) -> None:
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy", {"label_smoothing": bad})])
    expect_violation(stub.Evaluate, request, "functions[0].params.label_smoothing", "finite")


def test_non_finite_number_inside_a_list_param(stub: pb_grpc.LossServiceStub) -> None:
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy"), spec("nll", {"weight": [1.0, math.inf, 1.0, 1.0]})])
    expect_violation(stub.Evaluate, request, "functions[1].params.weight[1]", "finite", "inf")


def test_integer_param_beyond_int64(stub: pb_grpc.LossServiceStub) -> None:
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy", {"ignore_index": 1e30})])
    expect_violation(stub.Evaluate, request, "functions[0].params.ignore_index", "2^63")


# -- forged states ----------------------------------------------------------------------------------
def test_prior_state_missing_a_field(stub: pb_grpc.LossServiceStub) -> None:
    state = state_of(stub, "cross_entropy")
    del state.fields["weight"]
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy")], prior_states={"cross_entropy": state})
    expect_violation(stub.Evaluate, request, "prior_states.cross_entropy.fields", "missing ['weight']")


def test_finalize_state_with_an_extra_field(stub: pb_grpc.LossServiceStub) -> None:
    state = state_of(stub, "f1")
    state.fields["bins"].CopyFrom(encode_tensor(np.zeros((15, 3)), "bins"))
    request = pb.FinalizeRequest(states=[pb.NamedState(alias="f1", state=state)])
    expect_violation(stub.Finalize, request, "states[0].state.fields", "unexpected ['bins']")


def test_negative_weight_is_refused(stub: pb_grpc.LossServiceStub) -> None:
    """The issue's forgery: total -1e6 with weight -3 gave cross_entropy 999,999.37 with denominator -1."""
    state = state_of(stub, "cross_entropy")
    state.fields["total"].CopyFrom(encode_tensor(np.float64(-1e6), "total"))
    state.fields["weight"].CopyFrom(encode_tensor(np.float64(-3.0), "weight"))
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy")], prior_states={"cross_entropy": state})
    expect_violation(stub.Evaluate, request, "prior_states.cross_entropy.fields.weight", "non-negative", "-3.0")
    finalize = pb.FinalizeRequest(states=[pb.NamedState(alias="ce", state=state)])
    expect_violation(stub.Finalize, finalize, "states[0].state.fields.weight", "non-negative")


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_counts_are_finite_and_non_negative(stub: pb_grpc.LossServiceStub, bad: float) -> None:
    state = state_of(stub, "mse", {"predictions": encode_tensor(np.ones(4), "p"), "targets": encode_tensor(np.zeros(4), "t")})
    state.fields["count"].CopyFrom(encode_tensor(np.float64(bad), "count"))
    expect_violation(stub.Finalize, pb.FinalizeRequest(states=[pb.NamedState(alias="m", state=state)]), "states[0].state.fields.count")


def test_confusion_state_must_be_square(stub: pb_grpc.LossServiceStub) -> None:
    state = state_of(stub, "confusion_matrix")
    state.fields["matrix"].CopyFrom(encode_tensor(np.zeros((5000, 2)), "matrix"))
    request = pb.FinalizeRequest(states=[pb.NamedState(alias="cm", state=state)])
    expect_violation(stub.Finalize, request, "states[0].state.fields.matrix", "K×K", "4096")


def test_calibration_bins_must_match_n_bins(stub: pb_grpc.LossServiceStub) -> None:
    state = state_of(stub, "ece")  # n_bins=15
    state.fields["bins"].CopyFrom(encode_tensor(np.zeros((7, 3)), "bins"))
    request = pb.FinalizeRequest(states=[pb.NamedState(alias="ece", state=state)])
    expect_violation(stub.Finalize, request, "states[0].state.fields.bins", "n_bins=15")


def test_state_field_dtype(stub: pb_grpc.LossServiceStub) -> None:
    state = state_of(stub, "cross_entropy")
    state.fields["total"].CopyFrom(encode_tensor(np.float32(1.0), "total"))
    request = pb.FinalizeRequest(states=[pb.NamedState(alias="ce", state=state)])
    expect_violation(stub.Finalize, request, "states[0].state.fields.total", "float64")


def test_state_identity(stub: pb_grpc.LossServiceStub) -> None:
    good = state_of(stub, "cross_entropy")
    for field, change in [
        ("function", lambda s: setattr(s, "function", "no_such_loss")),
        ("params_json", lambda s: setattr(s, "function", "f1")),  # f1 declares other parameters (and fields)
        ("fields", lambda s: (setattr(s, "function", "distillation_kl"), setattr(s, "params_json", "{}"))),  # declares total, rows
        ("version", lambda s: setattr(s, "version", 99)),
        ("params_json", lambda s: setattr(s, "params_json", "[1, 2")),
        ("params_json.label_smoothing", lambda s: setattr(s, "params_json", json.dumps({"label_smoothing": 7}))),
        ("batches", lambda s: setattr(s, "batches", 2**63)),
    ]:
        state = pb.State()
        state.CopyFrom(good)
        change(state)
        request = pb.FinalizeRequest(states=[pb.NamedState(alias="ce", state=state)])
        message, violations = rejected(stub.Finalize, request)
        assert any(f.startswith(f"states[0].state.{field}") for f in violations), (field, violations)


def test_merged_batches_cannot_overflow(stub: pb_grpc.LossServiceStub) -> None:
    """Each state within bounds, their sum past uint64: refused, never an encoding failure."""
    state = state_of(stub, "cross_entropy")
    state.batches = 2**40
    states = [pb.NamedState(alias="ce", state=state)] * 2
    response = stub.Finalize(pb.FinalizeRequest(states=states), timeout=30)
    assert response.batches == 2**41


# -- tensor shapes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([1] * 65, "dimensions"),
        ([0, 2**62], "2^31"),
        ([0, 2**31 - 1, 2**31 - 1], "2^37"),
        ([-1, 4], "[0, 2^31 - 1]"),
        ([-(2**63), 0], "[0, 2^31 - 1]"),
        ([2**32, 2**32], "2^31"),
    ],
)
def test_hostile_shapes(stub: pb_grpc.LossServiceStub, shape: list[int], fragment: str) -> None:
    tensors = batch()
    tensors["logits"] = pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"")
    request = pb.EvaluateRequest(tensors=tensors, functions=[spec("cross_entropy")])
    expect_violation(stub.Evaluate, request, "tensors.logits", fragment)


def test_unknown_dtype_enum(stub: pb_grpc.LossServiceStub) -> None:
    tensors = batch()
    tensors["logits"].dtype = 99  # type: ignore[assignment]
    expect_violation(stub.Evaluate, pb.EvaluateRequest(tensors=tensors, functions=[spec("cross_entropy")]), "tensors.logits", "99")


def test_state_field_shape_over_the_dimension_bound(stub: pb_grpc.LossServiceStub) -> None:
    state = state_of(stub, "cross_entropy")
    state.fields["total"].CopyFrom(pb.Tensor(dtype=pb.FLOAT64, shape=[1] * 70, data=np.float64(1).tobytes()))
    request = pb.FinalizeRequest(states=[pb.NamedState(alias="ce", state=state)])
    expect_violation(stub.Finalize, request, "states[0].state.fields.total", "dimensions")


# -- names, aliases and sizes -----------------------------------------------------------------------
def test_empty_names(stub: pb_grpc.LossServiceStub) -> None:
    expect_violation(stub.Evaluate, pb.EvaluateRequest(tensors=batch(), functions=[spec("")]), "functions[0].name")
    tensors = {**batch(), "": encode_tensor(np.zeros(2), "x")}
    expect_violation(stub.Evaluate, pb.EvaluateRequest(tensors=tensors, functions=[spec("cross_entropy")]), "tensors")


def test_duplicate_aliases(stub: pb_grpc.LossServiceStub) -> None:
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy", alias="a"), spec("nll", alias="a")])
    expect_violation(stub.Evaluate, request, "functions[1].alias", "already used")


def test_huge_names_give_a_bounded_status(stub: pb_grpc.LossServiceStub) -> None:
    """Client text quoted in a status is cut: the trailers stay far under the peer's metadata limit."""
    name = "x" * 200_000
    request = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy", {name: 1.0}), spec(name)], request_id=name)
    message, violations = rejected(stub.Evaluate, request)
    assert len(message) <= 1000 and all(len(f) <= 200 and len(d) <= 400 for f, d in violations.items())
    assert any(f.startswith("functions[0].params.xxx") for f in violations), violations
    aliases = [spec("cross_entropy", alias=f"{i}{name[:5000]}") for i in range(200)] + [spec("cross_entropy", alias=f"0{name[:5000]}")]
    message, violations = rejected(stub.Evaluate, pb.EvaluateRequest(tensors=batch(), functions=aliases))
    assert "functions[200].alias" in violations


def test_server_still_serves_after_hostile_requests(stub: pb_grpc.LossServiceStub) -> None:
    response = stub.Evaluate(pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy")]), timeout=30)
    assert response.results[0].values["value"] > 0


# -- bytes that do not parse ------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [b"\x2a\x02\xff\xfe", b"\xff\xff\xff", b"\x12\x05\x0a\x03\xc3\x28a"])
def test_undecodable_request_bytes(address: str, payload: bytes) -> None:
    """Bad UTF-8 in a string or a corrupt wire format: INVALID_ARGUMENT, not gRPC's UNKNOWN."""
    with grpc.insecure_channel(address) as channel:
        evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate")
        expect_violation(evaluate, payload, "request", "lossd.v1.EvaluateRequest", "do not parse")
        stream = channel.stream_unary("/lossd.v1.LossService/EvaluateStream")
        good = pb.EvaluateRequest(tensors=batch(), functions=[spec("cross_entropy")]).SerializeToString()
        expect_violation(lambda messages, timeout: stream(iter(messages), timeout=timeout), [good, payload], "request")


@pytest.mark.parametrize("dtype", [pb.BFLOAT16, pb.FLOAT16, pb.FLOAT32, pb.INT32, pb.UINT8, pb.BOOL, 0, 77])
def test_state_field_wire_dtype(stub: pb_grpc.LossServiceStub, dtype: int) -> None:
    """A bfloat16 state field once reached torch.from_numpy (INTERNAL): found by make fuzz."""
    state = state_of(stub, "cross_entropy")
    state.fields["total"].CopyFrom(pb.Tensor(dtype=pb.FLOAT64, shape=[], data=bytes(2)))
    state.fields["total"].dtype = dtype  # type: ignore[assignment]
    request = pb.FinalizeRequest(states=[pb.NamedState(alias="ce", state=state)])
    expect_violation(stub.Finalize, request, "states[0].state.fields.total", "float64 or int64")
