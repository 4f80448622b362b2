"""Our exception hierarchy: every failed call raises one of these, ``from`` the gRPC error.

* LossdError                    a call failed; ``.code`` (grpc.StatusCode), ``.message``, ``.status``
  + InvalidArgumentError        INVALID_ARGUMENT: the request is wrong; ``.violations`` [(field, description)]
                                from google.rpc.BadRequest. Also a ``ValueError``.
  + ResourceExhaustedError      RESOURCE_EXHAUSTED: a message over a size limit, a request over a
                                server budget, or an overloaded server (``.reason``, ``.setting``:
                                the setting to raise; overloaded answers are retried first)
  + DeadlineExceededError       DEADLINE_EXCEEDED: the call's timeout passed. Also a ``TimeoutError``.
  + UnavailableError            UNAVAILABLE: no server could be reached (``.unreached``; retried
                                first), a server that said to retry (retried first), or a server
                                lost during the call (never retried: the request may have crashed it)
  + CancelledError              CANCELLED
  + UnknownError                UNKNOWN
  + NotFoundError               NOT_FOUND
  + AlreadyExistsError          ALREADY_EXISTS
  + PermissionDeniedError       PERMISSION_DENIED
  + UnauthenticatedError        UNAUTHENTICATED
  + FailedPreconditionError     FAILED_PRECONDITION
  + AbortedError                ABORTED
  + OutOfRangeError             OUT_OF_RANGE
  + UnimplementedError          UNIMPLEMENTED: e.g. a server of an older protocol version
  + InternalError               INTERNAL: a server bug; the message carries the request id to find
                                it in the server log (never a stack trace)
  + DataLossError               DATA_LOSS

Problems found before anything is sent are ordinary local errors and never
reach the network: :class:`lossd.client.specs.SpecError` (a function spec
that does not parse) and :class:`lossd.client.codec.TensorError` (a tensor
that cannot be encoded), both ``ValueError`` subclasses; ``TypeError`` /
``ValueError`` for other bad arguments.

Map a ``grpc.RpcError`` with ``raise from_rpc_error(exc) from exc``.
``compute="local"`` raises the :class:`InvalidArgumentError` the server would
answer for the same bad batch (:func:`invalid_argument`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lossd.client.messages import in_batch

__all__ = [
    "FieldViolation",
    "LossdError",
    "CancelledError",
    "UnknownError",
    "InvalidArgumentError",
    "DeadlineExceededError",
    "NotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "AbortedError",
    "OutOfRangeError",
    "UnimplementedError",
    "InternalError",
    "UnavailableError",
    "DataLossError",
    "UnauthenticatedError",
    "STATUS_ERRORS",
    "error_class",
    "from_rpc_error",
    "invalid_argument",
    "naming_batch",
    "retry_pushback_ms",
    "PUSHBACK_KEY",
]

PUSHBACK_KEY = "grpc-retry-pushback-ms"


class FieldViolation(NamedTuple):
    """One bad field of a request: ``field`` is a path like ``tensors.logits`` or ``functions[0].params.n_bins``."""

    field: str
    description: str


class LossdError(Exception):
    """A lossd call failed with a non-OK gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, status: status_pb2.Status | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.status = status  # google.rpc.Status with rich details, when the server sent one
        super().__init__(f"{self.code.name}: {message}")

    def details(self, message_type: type[Any]) -> list[Any]:
        """Return the status details of one type (e.g. ``error_details_pb2.ErrorInfo``), unpacked."""
        out = []
        for detail in self.status.details if self.status is not None else ():
            if detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                detail.Unpack(message)
                out.append(message)
        return out


class CancelledError(LossdError):
    """CANCELLED: the call was cancelled (by the caller, or the server going away)."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(LossdError):
    """UNKNOWN: a failure without a status of its own."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(LossdError, ValueError):
    """The request is wrong; ``violations`` name each bad field and say what was expected."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, status: status_pb2.Status | None = None) -> None:
        super().__init__(message, code=code, status=status)
        self.violations = [
            FieldViolation(v.field, v.description) for bad in self.details(error_details_pb2.BadRequest) for v in bad.field_violations
        ]


class DeadlineExceededError(LossdError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed before the answer came."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(LossdError):
    """NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LossdError):
    """ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(LossdError):
    """PERMISSION_DENIED: the caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


# gRPC's own refusal of a message over a peer's size limit, e.g. "SERVER: Received message larger than max (270423 vs. 65536)".
_SIZE_REFUSAL = re.compile(r"(?:(SERVER|CLIENT): )?(Received|Sent) message larger than max")
_SERVER_LIMIT = "the server's max_message_bytes (LOSSD_MAX_MESSAGE_BYTES)"
_SIZE_HINTS: dict[tuple[str, str], tuple[str, str]] = {  # (side, direction) -> (setting, what to do)
    ("SERVER", "Received"): (
        "max_message_bytes",
        f"the request is over {_SERVER_LIMIT}: send smaller batches (evaluate sends a batch over chunk_bytes in parts "
        "when every function is splittable), or raise that setting",
    ),
    ("SERVER", "Sent"): ("max_message_bytes", f"the response is over {_SERVER_LIMIT}: ask for fewer per-element outputs, or raise it"),
    ("CLIENT", "Received"): (
        "grpc.max_receive_message_length",
        "the response is over this client's grpc.max_receive_message_length option",
    ),
    ("CLIENT", "Sent"): ("grpc.max_send_message_length", "the request is over this client's grpc.max_send_message_length option"),
    ("", "Received"): (
        "max_message_bytes",
        f"a request over {_SERVER_LIMIT}, or a response over this client's grpc.max_receive_message_length option",
    ),
    ("", "Sent"): ("max_message_bytes", f"a response over {_SERVER_LIMIT}, or a request over this client's grpc.max_send_message_length"),
}


class ResourceExhaustedError(LossdError):
    """Over a limit; ``setting`` names the setting that raises it: the server's, when it said so, or gRPC's message-size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, status: status_pb2.Status | None = None) -> None:
        refusal = None if status is not None else _SIZE_REFUSAL.search(message)
        if refusal is not None:  # gRPC's own words name no setting: say which one, and what to do
            setting, hint = _SIZE_HINTS[(refusal.group(1) or "", refusal.group(2))]
            message = f"{message}; {hint}"
        super().__init__(message, code=code, status=status)
        infos = self.details(error_details_pb2.ErrorInfo)
        self.reason: str | None = infos[0].reason if infos else None
        self.setting: str | None = infos[0].metadata.get("setting") if infos else None
        if refusal is not None:
            self.reason, self.setting = "MESSAGE_TOO_LARGE", setting


class FailedPreconditionError(LossdError):
    """FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(LossdError):
    """ABORTED."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(LossdError):
    """OUT_OF_RANGE."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(LossdError):
    """UNIMPLEMENTED: e.g. a server of an older protocol version."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LossdError):
    """INTERNAL: a server bug; the message carries the request id to find it in the server log."""

    code = grpc.StatusCode.INTERNAL


# gRPC's words when it could not connect at all (the load-balancing picker failed, or name
# resolution did): the call never reached any server. Anything else may have reached one.
_UNREACHED = re.compile(
    r"(failed to connect to all addresses|connections to all backends failing|DNS resolution failed|empty address list)"
)
_LOST_HINT = (
    "; the server was lost during the call or refused it, and the request may have reached it (a request that crashed "
    "one server would crash the next): it is not retried"
)


class UnavailableError(LossdError):
    """UNAVAILABLE: no server could be reached, or a server was lost during the call (or refused it).

    ``unreached``: gRPC could not connect to any server, so the call never
    reached one (safe to retry). ``retry_marked``: the server answered and
    said to retry (a ``google.rpc.RetryInfo``, or a retry pushback >= 0).
    Otherwise the request may have reached a server's handler (the
    server died under it: "Socket closed"), and the message says so.
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        status: status_pb2.Status | None = None,
        pushback_ms: int | None = None,
    ) -> None:
        self.unreached = _UNREACHED.match(message) is not None
        hinted = status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        self.retry_marked = hinted or (pushback_ms is not None and pushback_ms >= 0)
        if not (self.unreached or self.retry_marked):
            message += _LOST_HINT
        super().__init__(message, code=code, status=status)


class DataLossError(LossdError):
    """DATA_LOSS."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(LossdError):
    """UNAUTHENTICATED: no valid bearer token or client certificate."""

    code = grpc.StatusCode.UNAUTHENTICATED


# Every non-OK status code -> its exception class (OK is not an error).
STATUS_ERRORS: dict[grpc.StatusCode, type[LossdError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def invalid_argument(violations: Sequence[tuple[str, str]], details: Sequence[any_pb2.Any] = ()) -> InvalidArgumentError:
    """The InvalidArgumentError a server answers with for these (field, description) violations (and further status details)."""
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    packed = any_pb2.Any()
    packed.Pack(bad)
    message = "; ".join(f"{f}: {d}" for f, d in violations)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[packed, *details])
    return InvalidArgumentError(message, status=status)


def naming_batch(exc: InvalidArgumentError, batch: str) -> InvalidArgumentError:
    """``exc`` with each violation saying which batch of a run or stream brought it (``batch``: see ``batch_label``)."""
    others = [d for d in exc.status.details if not d.Is(error_details_pb2.BadRequest.DESCRIPTOR)] if exc.status is not None else []
    return invalid_argument([(v.field, in_batch(v.description, batch)) for v in exc.violations], others)


def error_class(code: grpc.StatusCode) -> type[LossdError]:
    """Return the exception class of a non-OK status code."""
    if code not in STATUS_ERRORS:
        raise ValueError(f"expected a non-OK grpc.StatusCode, got {code!r}")
    return STATUS_ERRORS[code]


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    if not hasattr(exc, "trailing_metadata"):
        return None
    try:
        return rpc_status.from_call(exc)
    except ValueError:  # details inconsistent with the status: keep the plain status
        return None


def from_rpc_error(exc: grpc.RpcError) -> LossdError:
    """Return the :class:`LossdError` for a failed call (sync or asyncio); raise it ``from exc``."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(message, code=code, status=_rich_status(exc), pushback_ms=retry_pushback_ms(exc))
    return STATUS_ERRORS[code](message, code=code, status=_rich_status(exc))


def retry_pushback_ms(exc: BaseException | None) -> int | None:
    """The ``grpc-retry-pushback-ms`` of a failed call's trailers (sync or asyncio), or None; -1 means "do not retry"."""
    trailing_metadata = getattr(exc, "trailing_metadata", None)
    for key, value in (trailing_metadata() if callable(trailing_metadata) else None) or ():
        if key == PUSHBACK_KEY:
            try:
                return int(value)
            except ValueError:
                return -1  # gRPC reads a pushback that is not an integer as "do not retry"
    return None
