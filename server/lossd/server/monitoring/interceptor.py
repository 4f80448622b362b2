"""gRPC server metrics under go-grpc-prometheus names, from a grpc.aio server interceptor.

``grpc_server_started_total``, ``grpc_server_handled_total`` (with
``grpc_code``), ``grpc_server_handling_seconds``, ``grpc_server_msg_received_total``
and ``grpc_server_msg_sent_total`` carry the labels ``grpc_type`` (unary,
client_stream, server_stream, bidi_stream), ``grpc_service`` and
``grpc_method``, as the Go middleware exports them, so existing gRPC
dashboards and alerts apply unchanged. lossd adds payload sizes (histograms, and
``lossd_grpc_received_bytes_total`` / ``lossd_grpc_sent_bytes_total``) and in-flight
requests. Sizes are the wire bytes, read where grpc deserializes requests and
serializes responses (``len`` of the bytes it already holds): a 16 MB request
is never serialized again to be measured.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GrpcMetrics", "MetricsInterceptor"]

# prometheus.DefBuckets of the Go client, extended to the gateway's 60 s deadline.
HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = tuple(float(4**i) for i in range(4, 16))  # 256 B .. 1 GiB


class GrpcMetrics:
    """The gRPC metric families of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        base = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.", base, registry=registry)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*base, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server, in seconds.",
            base,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )
        self.received = Counter("grpc_server_msg_received", "Messages received by the server.", base, registry=registry)
        self.sent = Counter("grpc_server_msg_sent", "Messages sent by the server.", base, registry=registry)
        self.request_bytes = Histogram(
            "lossd_grpc_request_size_bytes",
            "Serialized size of request messages, in bytes.",
            ["grpc_service", "grpc_method"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.response_bytes = Histogram(
            "lossd_grpc_response_size_bytes",
            "Serialized size of response messages, in bytes.",
            ["grpc_service", "grpc_method"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.received_bytes = Counter(
            "lossd_grpc_received_bytes", "Wire bytes of request messages received.", ["grpc_service", "grpc_method"], registry=registry
        )
        self.sent_bytes = Counter(
            "lossd_grpc_sent_bytes", "Wire bytes of response messages sent.", ["grpc_service", "grpc_method"], registry=registry
        )
        self.in_flight = Gauge(
            "lossd_grpc_in_flight_requests",
            "RPCs being handled now.",
            ["grpc_service", "grpc_method"],
            registry=registry,
            multiprocess_mode="livesum",  # over the live workers of lossd serve --workers N
        )


_HANDLER_TYPES = (
    ("unary_unary", "unary"),
    ("stream_unary", "client_stream"),
    ("unary_stream", "server_stream"),
    ("stream_stream", "bidi_stream"),
)


def _split_method(full: str) -> tuple[str, str]:
    """'/lossd.v1.LossService/Evaluate' -> ('lossd.v1.LossService', 'Evaluate')."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class _Sized(NamedTuple):
    """A deserialized request with the length of its wire bytes (unwrapped before the handler sees it)."""

    message: Any
    nbytes: int


Codec = Callable[[Any], Any] | None


def _measured_deserializer(deserialize: Codec) -> Callable[[bytes], _Sized]:
    def measured(raw: bytes) -> _Sized:
        return _Sized(deserialize(raw) if deserialize is not None else raw, len(raw))

    return measured


def _measured_serializer(serialize: Codec, observe: Callable[[float], None]) -> Callable[[Any], Any]:
    def measured(message: Any) -> Any:
        data = serialize(message) if serialize is not None else message
        observe(len(data))
        return data

    return measured


def _unwrap(request: Any) -> tuple[Any, int]:
    return (request.message, request.nbytes) if isinstance(request, _Sized) else (request, 0)


class _Series:
    """The label children of one method's series, resolved once: ``labels()`` costs more than the update."""

    def __init__(self, metrics: GrpcMetrics, grpc_type: str, service: str, method: str) -> None:
        base, short = (grpc_type, service, method), (service, method)
        self.base = base
        self.handled_family = metrics.handled
        self.started = metrics.started.labels(*base)
        self.handling = metrics.handling.labels(*base)
        self.received = metrics.received.labels(*base)
        self.sent = metrics.sent.labels(*base)
        self.request_bytes = metrics.request_bytes.labels(*short)
        self.received_bytes = metrics.received_bytes.labels(*short)
        self.in_flight = metrics.in_flight.labels(*short)
        self._handled: dict[str, Any] = {}

    def handled(self, code: str) -> Any:
        """The handled counter of ``code`` (a child per status code seen)."""
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self.handled_family.labels(*self.base, code)
        return child


class _Call:
    """Metrics of one RPC: started on creation, handled by :meth:`done`."""

    __slots__ = ("series", "start")

    def __init__(self, series: _Series) -> None:
        self.series = series
        self.start = time.perf_counter()
        series.started.inc()
        series.in_flight.inc()

    def requests(self, request: Any, streaming: bool) -> Any:
        """Count the request now, or wrap the request iterator to count messages as they are read."""
        if not streaming:
            return self.received(request)

        async def counted() -> AsyncIterator[Any]:
            async for message in request:
                yield self.received(message)

        return counted()

    def received(self, request: Any) -> Any:
        """Count one request message (sized by the deserializer); return the message itself."""
        message, nbytes = _unwrap(request)
        self.series.received.inc()
        self.series.request_bytes.observe(nbytes)
        self.series.received_bytes.inc(nbytes)
        return message

    def sent(self, message: Any) -> None:
        """Count one response message (its size is observed when grpc serializes it)."""
        self.series.sent.inc()

    def done(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        self.series.in_flight.dec()
        self.series.handling.observe(time.perf_counter() - self.start)
        self.series.handled(_code_name(context, error)).inc()


def _code_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """Wraps every handler so that each RPC is counted, timed and sized.

    grpc asks the interceptor for a handler on every call; the wrapped handler
    of a method is built once and reused while the inner handler is the same
    object (an inner interceptor answering with a handler of its own, such as
    a refusal, gets it wrapped afresh)."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self.metrics = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._series: dict[tuple[str, str, str], _Series] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        full = handler_call_details.method
        cached = self._wrapped.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, full)
        self._wrapped[full] = (handler, wrapped)  # the latest: in steady state, the registered handler
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        service, method = _split_method(full)
        for attr, grpc_type in _HANDLER_TYPES:
            behavior = getattr(handler, attr)
            if behavior is not None:
                key = (grpc_type, service, method)
                series = self._series.get(key) or self._series.setdefault(key, _Series(self.metrics, *key))
                streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
                wrapped = self._wrap(behavior, series, streaming_in=streaming_in, streaming_out=streaming_out)
                return handler._replace(
                    **{attr: wrapped},
                    request_deserializer=_measured_deserializer(handler.request_deserializer),
                    response_serializer=_measured_serializer(handler.response_serializer, self._sized_response(service, method)),
                )
        return handler

    def _sized_response(self, service: str, method: str) -> Callable[[float], None]:
        size, total = self.metrics.response_bytes.labels(service, method), self.metrics.sent_bytes.labels(service, method)

        def observe(nbytes: float) -> None:
            size.observe(nbytes)
            total.inc(nbytes)

        return observe

    def _wrap(self, behavior: Callable[..., Any], series: _Series, *, streaming_in: bool, streaming_out: bool) -> Callable[..., Any]:
        if streaming_out and inspect.isasyncgenfunction(behavior):
            return self._generated(behavior, series, streaming_in=streaming_in)
        returns_message = not streaming_out  # a streaming handler may also be a coroutine writing with context.write

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(series)
            request = call.requests(request, streaming_in)
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
                if returns_message:
                    call.sent(response)
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                call.done(context, error)

        return wrapped

    def _generated(self, behavior: Callable[..., Any], series: _Series, *, streaming_in: bool) -> Callable[..., Any]:
        async def generated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(series)
            request = call.requests(request, streaming_in)
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    call.sent(response)
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                call.done(context, error)

        return generated
