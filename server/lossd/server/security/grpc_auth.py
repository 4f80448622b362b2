"""The gRPC side of bearer-token authentication: a grpc.aio server interceptor.

Every call but the ``grpc.health.v1`` service must carry metadata
``authorization: Bearer <token>``; others are answered ``UNAUTHENTICATED`` with
a ``www-authenticate`` trailer, without running the handler. The caller's
token name is set for the handler (:func:`~lossd.server.security.tokens.current_caller`)
and logged at debug level.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lossd.server.security.tokens import Authenticator, Unauthenticated

__all__ = ["AuthInterceptor", "OPEN_GRPC_PREFIXES", "WWW_AUTHENTICATE"]

log = logging.getLogger("lossd.security")

OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)  # probes carry no token
WWW_AUTHENTICATE = 'Bearer realm="lossd"'

_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _refusal(error: Unauthenticated, streaming_out: bool) -> Callable[..., Any]:
    trailer = (("www-authenticate", WWW_AUTHENTICATE),)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.detail, trailer)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.detail, trailer)
        yield  # pragma: no cover - abort raises; the yield makes this an async generator

    assert inspect.isasyncgenfunction(refuse_stream)
    return refuse_stream if streaming_out else refuse


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no stubs
    """Refuses calls without a valid bearer token (health checks excepted)."""

    def __init__(self, authenticator: Authenticator, *, open_prefixes: tuple[str, ...] = OPEN_GRPC_PREFIXES) -> None:
        self.authenticator = authenticator
        self.open_prefixes = open_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        values = [str(v) for k, v in (handler_call_details.invocation_metadata or ()) if k == "authorization"]
        try:
            caller = self.authenticator.authenticate(values, "grpc")
        except Unauthenticated as exc:
            log.info("refused %s: %s", method, exc.reason)
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
                return handler
            attr = next(a for a in _BEHAVIORS if getattr(handler, a) is not None)
            return handler._replace(**{attr: _refusal(exc, handler.response_streaming)})
        log.debug("caller %s calls %s", caller, method)
        return await continuation(handler_call_details)
