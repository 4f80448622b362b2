"""The exception hierarchy: every gRPC status code maps to its own class, rich details are parsed."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import lossd.client
from lossd.client import errors
from lossd.client.errors import (
    STATUS_ERRORS,
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
    UnavailableError,
    error_class,
    from_rpc_error,
)

NON_OK = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]


class FakeRpcError(grpc.RpcError):
    """What grpc raises for a failed call: code(), details(), trailing_metadata()."""

    def __init__(self, code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None, metadata: tuple = ()) -> None:
        self._code, self._details = code, details
        self._metadata = metadata + ((("grpc-status-details-bin", status.SerializeToString()),) if status is not None else ())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._metadata


def packed(message: object) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


@pytest.mark.parametrize("code", NON_OK, ids=lambda c: c.name)
def test_every_status_code_maps(code: grpc.StatusCode) -> None:
    cls = error_class(code)
    assert issubclass(cls, LossdError) and cls is not LossdError
    assert cls.code is code
    assert cls.__name__ in errors.__all__ and cls.__name__ in lossd.client.__all__
    assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is not documented at the top of lossd.client.errors"
    exc = from_rpc_error(FakeRpcError(code, "what happened"))
    # UNAVAILABLE says too that the call may have reached the server it lost (so it is not retried)
    hint = "; the server was lost during the call" if code is grpc.StatusCode.UNAVAILABLE else ""
    assert type(exc) is cls and exc.code is code and exc.message.startswith("what happened" + hint)
    assert str(exc) == f"{code.name}: {exc.message}" and (hint or exc.message == "what happened")


def test_classes_are_distinct() -> None:
    assert set(STATUS_ERRORS) == set(NON_OK)
    assert len(set(STATUS_ERRORS.values())) == len(NON_OK)


def test_ok_is_not_an_error() -> None:
    with pytest.raises(ValueError, match="expected a non-OK grpc.StatusCode"):
        error_class(grpc.StatusCode.OK)
    assert type(from_rpc_error(FakeRpcError(grpc.StatusCode.OK, "odd"))) is errors.UnknownError


def test_invalid_argument_violations() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="tensors.labels", description="got 12 at flat index 3"),
            error_details_pb2.BadRequest.FieldViolation(field="functions[1].params.n_bins", description="expected an int"),
        ]
    )
    message = "tensors.labels: got 12 at flat index 3; functions[1].params.n_bins: expected an int"
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[packed(bad)])
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, message, status))
    assert isinstance(exc, InvalidArgumentError) and isinstance(exc, ValueError)
    assert exc.violations == [FieldViolation("tensors.labels", "got 12 at flat index 3"), ("functions[1].params.n_bins", "expected an int")]
    assert exc.status == status


def test_invalid_argument_without_details() -> None:
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "plain"))
    assert isinstance(exc, InvalidArgumentError) and exc.violations == [] and exc.status is None


def test_inconsistent_rich_status_is_ignored() -> None:
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="other")
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "plain", status))
    assert isinstance(exc, InvalidArgumentError) and exc.status is None


def test_resource_exhausted_setting() -> None:
    info = error_details_pb2.ErrorInfo(reason="STATE_LIMIT_EXCEEDED", domain="lossd", metadata={"setting": "exact_state_limit"})
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="too many scores", details=[packed(info)])
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many scores", status))
    assert isinstance(exc, ResourceExhaustedError)
    assert exc.reason == "STATE_LIMIT_EXCEEDED" and exc.setting == "exact_state_limit"
    assert [i.domain for i in exc.details(error_details_pb2.ErrorInfo)] == ["lossd"]
    plain = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"))
    assert isinstance(plain, ResourceExhaustedError) and plain.setting is None and plain.reason is None


@pytest.mark.parametrize(
    ("message", "setting", "named"),
    [
        ("SERVER: Received message larger than max (270423 vs. 65536)", "max_message_bytes", "the request is over the server's"),
        ("SERVER: Sent message larger than max (270423 vs. 65536)", "max_message_bytes", "the response is over the server's"),
        ("Stream removed (CLIENT: Received message larger than max (996 vs. 200))", "grpc.max_receive_message_length", "this client's"),
        ("CLIENT: Sent message larger than max (996 vs. 200)", "grpc.max_send_message_length", "this client's"),
        ("Received message larger than max (996 vs. 200)", "max_message_bytes", "or a response over this client's"),
    ],
)
def test_grpcs_own_message_size_refusal_names_the_setting(message: str, setting: str, named: str) -> None:
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
    assert isinstance(exc, ResourceExhaustedError)
    assert exc.setting == setting and exc.reason == "MESSAGE_TOO_LARGE"
    assert exc.message.startswith(message) and named in exc.message and setting in exc.message
    if setting == "max_message_bytes":
        assert "LOSSD_MAX_MESSAGE_BYTES" in exc.message


def test_builtin_bases() -> None:
    exc = from_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert isinstance(exc, DeadlineExceededError) and isinstance(exc, TimeoutError)
    assert str(exc) == "DEADLINE_EXCEEDED: Deadline Exceeded"


def test_raised_from_the_grpc_error() -> None:
    original = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(UnavailableError) as info:
        try:
            raise original
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
    assert info.value.__cause__ is original


def test_error_without_call_interface() -> None:
    exc = from_rpc_error(grpc.RpcError("bare"))
    assert type(exc) is errors.UnknownError and exc.message == "bare"
