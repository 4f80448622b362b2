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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lossd.client.codec import TensorError
from lossd.client.specs import SpecError
from lossd.kernels.errors import InvalidInput, StateLimitExceeded
from lossd.server.convert import diagnostic_to_proto

__all__ = ["rpc_errors", "status_for"]

log = logging.getLogger("lossd.server")

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _packed(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def status_for(exc: BaseException, request_id: str = "") -> status_pb2.Status:
    """The google.rpc.Status a failed request answers with."""
    if isinstance(exc, InvalidInput):
        violations = [error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in exc.violations]
        details = [_packed(error_details_pb2.BadRequest(field_violations=violations))]
        # Findings made before the failure (labels_out_of_range is both an error and a diagnostic).
        details += [_packed(diagnostic_to_proto(d)) for d in exc.diagnostics]
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=details)
    if isinstance(exc, (TensorError, SpecError)):
        field = getattr(exc, "field", "functions")
        description = getattr(exc, "description", str(exc))
        bad = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
        )
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}", details=[_packed(bad)])
    if isinstance(exc, StateLimitExceeded):
        info = error_details_pb2.ErrorInfo(reason="STATE_LIMIT_EXCEEDED", domain="lossd", metadata={"setting": exc.setting})
        return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(exc), details=[_packed(info)])
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error; the server log has the details under request id {request_id}"
    )


def rpc_errors(handler: Handler) -> Handler:
    """Wrap an async RPC handler so that every failure becomes a proper status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except (InvalidInput, TensorError, SpecError, StateLimitExceeded) as exc:
            await context.abort_with_status(rpc_status.to_status(status_for(exc)))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            request_id = getattr(request, "request_id", "") or uuid.uuid4().hex[:12]
            log.exception("%s failed (request id %s)", handler.__name__, request_id)
            await context.abort_with_status(rpc_status.to_status(status_for(exc, request_id)))

    return wrapper  # type: ignore[return-value]
