"""Logs of a lossd process: text by default, one JSON object per line with ``LOSSD_LOG_FORMAT=json``.

In JSON, every gRPC call and every gateway request also writes one line to
the ``lossd.requests`` logger::

    {"time": "...", "level": "INFO", "logger": "lossd.requests", "message": "request",
     "request_id": "3f2a9c1e7b4d", "kind": "grpc", "method": "/lossd.v1.LossService/Evaluate",
     "status": "OK", "duration_seconds": 0.0042, "bytes_in": 812, "bytes_out": 164,
     "tags": {"model": "m", "dataset": "d"}, "functions": ["cross_entropy"], "caller": "ci"}

``request_id`` is the request's own, or one generated here and echoed in the
response's ``request_id`` (gRPC) or the ``x-request-id`` header (HTTP; the id
is passed on to the backend call, so both lines carry it). ``caller`` is the
token's name when tokens are on (never the token). The gRPC line comes from an
interceptor outside the token check and the error handling, so refused and
failed calls are logged with their status code too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lossd.server.observability.tracing import context_metadata
from lossd.server.security import current_caller
from lossd.server.settings import Settings
from lossd.server.wire_request import received_bytes
from lossd.v1 import lossd_pb2 as pb

__all__ = [
    "REQUEST_LOGGER",
    "HttpRequestLogMiddleware",
    "RequestLogInterceptor",
    "annotate_gateway_request",
    "configure_logging",
    "uvicorn_log_options",
]

REQUEST_LOGGER = "lossd.requests"
REQUEST_ID_HEADER = "x-request-id"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_VALID_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable, no spaces: safe in a header and a log line

log = logging.getLogger(REQUEST_LOGGER)


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message and the record's extra fields."""
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


def configure_logging(settings: Settings) -> None:
    """Set the root handler's level and format (text or JSON) from ``settings``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    if settings.log_format == "json":  # uvicorn's own loggers print text lines otherwise
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True


def uvicorn_log_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config options: in JSON, its loggers use the root's handler and its access lines are left to lossd.requests."""
    return {"log_config": None, "access_log": False} if settings.log_format == "json" else {}


def new_request_id() -> str:
    """A fresh request id (12 hex digits, as the error handler's)."""
    return uuid.uuid4().hex[:12]


def _tags(tags: pb.Tags) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in (("model", tags.model), ("dataset", tags.dataset), ("split", tags.split)) if v}
    if tags.extra:
        out["extra"] = dict(tags.extra)
    return out


def _functions(message: Any) -> list[str]:
    specs = getattr(message, "functions", None)
    if specs is not None:
        return [s.alias or s.name for s in specs]
    states = getattr(message, "states", None)  # Finalize: the aliases of the states merged
    return sorted({s.alias for s in states}) if states is not None else []


class _CallRecord:
    """The fields of one gRPC call's line, filled in as its messages go by."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.start = time.perf_counter()
        self.request_id = ""
        self.tags: dict[str, Any] = {}
        self.functions: list[str] = []
        self.bytes_in = 0
        self.bytes_out = 0

    def received(self, message: Any) -> Any:
        self.bytes_in += received_bytes(message)  # ByteSize(), with tensor data left in the received bytes
        if not self.request_id:  # the first message of a stream names the call
            if hasattr(message, "request_id"):
                if not message.request_id:
                    message.request_id = new_request_id()  # echoed in the response and the error handler's log
                self.request_id = message.request_id
            if hasattr(message, "tags"):
                self.tags = _tags(message.tags)
            self.functions = _functions(message)
        return message

    def sent(self, message: Any) -> Any:
        self.bytes_out += message.ByteSize()
        return message

    def done(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        log.info(
            "request",
            extra={
                "request_id": self.request_id or new_request_id(),
                "kind": "grpc",
                "method": self.method,
                "status": _status_name(context, error),
                "duration_seconds": round(time.perf_counter() - self.start, 6),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "tags": self.tags,
                "functions": self.functions,
                **_caller_field(current_caller()),
            },
        )


def _caller_field(caller: str | None) -> dict[str, str]:
    return {"caller": caller} if caller else {}


def _status_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


_BEHAVIORS = ("unary_unary", "stream_unary", "unary_stream", "stream_stream")


class RequestLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Writes one ``lossd.requests`` line per call of the LossService (health checks are not logged)."""

    def __init__(self, prefix: str = "/lossd.") -> None:
        self.prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        attr = next(a for a in _BEHAVIORS if getattr(handler, a) is not None)
        return handler._replace(**{attr: self._wrap(getattr(handler, attr), method, handler.request_streaming, handler.response_streaming)})

    def _wrap(self, behavior: Callable[..., Any], method: str, streaming_in: bool, streaming_out: bool) -> Callable[..., Any]:
        if streaming_out:  # lossd has no server-streaming rpc; pass them through unlogged
            return behavior

        async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = _CallRecord(method)
            request = _counted(request, record) if streaming_in else record.received(request)
            error: BaseException | None = None
            try:
                return record.sent(await behavior(request, context))
            except BaseException as exc:
                error = exc
                raise
            finally:
                record.done(context, error)

        return logged


async def _counted(requests: AsyncIterator[Any], record: _CallRecord) -> AsyncIterator[Any]:
    async for message in requests:
        yield record.received(message)


def annotate_gateway_request(
    scope: Mapping[str, Any], request: pb.EvaluateRequest, metadata: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """Give a gateway request's backend call the HTTP request id, its log fields and the trace context.

    Returns ``metadata`` with the ``traceparent`` of the current span when
    tracing is on (the gRPC server span then joins the HTTP request's trace)."""
    state = scope.get("state")
    if isinstance(state, dict):
        if not request.request_id and state.get("request_id"):
            request.request_id = state["request_id"]
        state["request_id"] = request.request_id or state.get("request_id", "")
        state["log_fields"] = {"tags": _tags(request.tags), "functions": _functions(request)}
    return (*metadata, *context_metadata())


class HttpRequestLogMiddleware:
    """Writes one ``lossd.requests`` line per gateway request and answers with its ``x-request-id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        state = scope.setdefault("state", {})
        state["request_id"] = given if _VALID_REQUEST_ID.match(given) else new_request_id()
        status, bytes_in, bytes_out = 500, 0, 0

        async def counted_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        async def logged_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), state["request_id"].encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, logged_send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            log.info(
                "request",
                extra={
                    "request_id": state["request_id"],
                    "kind": "http",
                    "method": f"{scope['method']} {route or scope.get('path', '')}",
                    "status": status,
                    "duration_seconds": round(time.perf_counter() - start, 6),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    **state.get("log_fields", {"tags": {}, "functions": []}),
                    **_caller_field(state.get("caller")),
                },
            )
