"""Where logs and traces hook into the gRPC server and the gateway, so that app.py needs one line for each."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from fastapi import FastAPI

from lossd.server.observability.logging import HttpRequestLogMiddleware, RequestLogInterceptor
from lossd.server.observability.tracing import Tracing
from lossd.server.settings import Settings

__all__ = ["instrument_gateway", "server_interceptors"]


def server_interceptors(
    settings: Settings, tracing: Tracing | None, given: Sequence[grpc.aio.ServerInterceptor]
) -> list[grpc.aio.ServerInterceptor]:
    """``given`` (monitoring's) between the trace span (outermost: it covers the whole call) and the request log.

    The request log sits inside monitoring, which unwraps the messages it
    measures, and outside the token check (appended after it), so refusals are
    logged with their status."""
    outer = [tracing.server_interceptor()] if tracing is not None else []
    inner = [RequestLogInterceptor()] if settings.log_format == "json" else []
    return [*outer, *given, *inner]


def instrument_gateway(app: FastAPI, settings: Settings, tracing: Tracing | None) -> None:
    """Add the request log (JSON logs) and the FastAPI spans (tracing) to a gateway app, outermost."""
    if settings.log_format == "json":
        app.add_middleware(HttpRequestLogMiddleware)
    if tracing is not None:
        tracing.instrument_app(app)
