"""Structured logs and OpenTelemetry traces of a lossd process.

- :mod:`~lossd.server.observability.logging`: text or JSON logs, one line per gRPC call and gateway request;
- :mod:`~lossd.server.observability.tracing`: spans for calls, decoding and each function's update and finalize.

Prometheus metrics are :mod:`lossd.server.monitoring`'s.
"""

from lossd.server.observability.logging import (
    REQUEST_LOGGER,
    HttpRequestLogMiddleware,
    RequestLogInterceptor,
    annotate_gateway_request,
    configure_logging,
)
from lossd.server.observability.tracing import Tracing, span

__all__ = [
    "REQUEST_LOGGER",
    "HttpRequestLogMiddleware",
    "RequestLogInterceptor",
    "Tracing",
    "annotate_gateway_request",
    "configure_logging",
    "span",
]
