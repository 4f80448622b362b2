"""Exceptions -> gRPC status with rich details, in one place for every RPC.

Bad input is INVALID_ARGUMENT with google.rpc.BadRequest field violations;
a bounded state over its limit is RESOURCE_EXHAUSTED with google.rpc.ErrorInfo
naming the setting; anything unexpected is INTERNAL with a request id, logged
here with its traceback and never sent to the client.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lossd.client.codec import TensorError
from lossd.client.local import diagnostic_to_proto
from lossd.client.specs import SpecError
from lossd.kernels.cancellation import Cancelled, DeadlineExceeded
from lossd.kernels.errors import InvalidInput, StateLimitExceeded
from lossd.server.wire_request import release_tensor_data, undecodable

__all__ = ["rpc_errors", "status_for"]

log = logging.getLogger("lossd.server")

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _packed(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


# The status travels in the call's trailers, whose size the peer bounds (8 KiB by
# default): field paths and descriptions quote client text (tensor, parameter and
# alias names), so each is cut, and so is the number of violations and diagnostics.
MAX_FIELD_CHARS = 200
MAX_DESCRIPTION_CHARS = 400
MAX_VIOLATIONS = 8
MAX_DIAGNOSTICS = 8
MAX_MESSAGE_CHARS = 1000
MAX_REQUEST_ID_CHARS = 64


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bad_request(violations: list[tuple[str, str]]) -> tuple[str, any_pb2.Any]:
    """(message, packed BadRequest) of field violations, cut to what a status can carry."""
    kept = [(_cut(f, MAX_FIELD_CHARS), _cut(d, MAX_DESCRIPTION_CHARS)) for f, d in violations[:MAX_VIOLATIONS]]
    message = "; ".join(f"{f}: {d}" for f, d in kept)
    if len(violations) > MAX_VIOLATIONS:
        message += f"; and {len(violations) - MAX_VIOLATIONS} more"
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in kept]
    )
    return _cut(message, MAX_MESSAGE_CHARS), _packed(bad)


def status_for(exc: BaseException, request_id: str = "") -> status_pb2.Status:
    """The google.rpc.Status a failed request answers with."""
    if isinstance(exc, InvalidInput):
        message, bad = _bad_request([(v.field, v.description) for v in exc.violations])
        # Findings made before the failure (labels_out_of_range is both an error and a diagnostic).
        details = [bad] + [_packed(diagnostic_to_proto(d)) for d in exc.diagnostics[:MAX_DIAGNOSTICS]]
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=details)
    if isinstance(exc, (TensorError, SpecError)):
        field = getattr(exc, "field", "functions")
        description = getattr(exc, "description", str(exc))
        message, bad = _bad_request([(field, description)])
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[bad])
    if isinstance(exc, StateLimitExceeded):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain="lossd", metadata={"setting": exc.setting})
        details = [_packed(info)]
        if exc.retry_after is not None:  # an overloaded server: the same request may succeed later
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(exc.retry_after * 1e9))
            details.append(_packed(retry))
        return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=_cut(str(exc), MAX_MESSAGE_CHARS), details=details)
    if isinstance(exc, Cancelled):  # DeadlineExceeded is a Cancelled
        code = code_pb2.DEADLINE_EXCEEDED if isinstance(exc, DeadlineExceeded) else code_pb2.CANCELLED
        return status_pb2.Status(code=code, message=str(exc))
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; the server log has the details under request id {_cut(request_id, MAX_REQUEST_ID_CHARS)}",
    )


class _Status(grpc.Status):  # type: ignore[misc]  # grpc.Status is an untyped abstract class
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def _with_pushback(status: grpc.Status, exc: BaseException) -> grpc.Status:
    """Add gRPC's retry pushback to a RESOURCE_EXHAUSTED answer: gRPC retry policies honour it.

    An overloaded server asks for a retry after its (jittered) hint; any other
    exhausted budget says never (a negative pushback), so a request that is too
    big for one replica is never replayed onto the next."""
    if not isinstance(exc, StateLimitExceeded):
        return status
    pushback = "-1" if exc.retry_after is None else str(max(1, round(exc.retry_after * 1000)))
    return _Status(status.code, status.details, (*status.trailing_metadata, ("grpc-retry-pushback-ms", pushback)))


def _check_decoded() -> None:
    error = undecodable()
    if error is not None:
        raise InvalidInput.single(*error)


async def _decoded(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in messages:
        _check_decoded()
        yield message


def rpc_errors(handler: Handler) -> Handler:
    """Wrap an async RPC handler so that every failure becomes a proper status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_decoded()
            if hasattr(request, "__aiter__"):  # a client stream: each message is checked as it arrives
                request = _decoded(request)
            return await handler(self, request, context)
        except (InvalidInput, TensorError, SpecError, StateLimitExceeded, Cancelled) as exc:
            await context.abort_with_status(_with_pushback(rpc_status.to_status(status_for(exc)), exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            # A stream handler gets an iterator, not a message: it has no request id of its own.
            request_id = _cut(str(getattr(request, "request_id", "") or ""), MAX_REQUEST_ID_CHARS) or uuid.uuid4().hex[:12]
            log.exception("%s failed (request id %s)", handler.__name__, request_id)
            await context.abort_with_status(rpc_status.to_status(status_for(exc, request_id)))
        finally:
            release_tensor_data()  # a request that failed before its decode: timers scheduled later must not keep its bytes

    return wrapper  # type: ignore[return-value]
