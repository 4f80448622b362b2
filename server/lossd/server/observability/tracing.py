"""OpenTelemetry traces: off by default, on with ``LOSSD_TRACING`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``.

With tracing on, the official instrumentations open a server span per gRPC
call (``opentelemetry-instrumentation-grpc``, joining the caller's trace when
its metadata carries a ``traceparent``) and per gateway request
(``opentelemetry-instrumentation-fastapi``); inside them lossd adds
``lossd.decode`` and, per function, ``lossd.update`` and ``lossd.finalize``
(through :mod:`lossd.kernels.spans`). Spans go to the console or to an OTLP/gRPC
collector configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables.

Off, nothing of OpenTelemetry is imported and :func:`span` returns a shared
no-op context manager. The packages come with the ``tracing`` extra of
lossd-server.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Literal

from lossd.kernels.spans import set_span_factory
from lossd.server.settings import Settings

if TYPE_CHECKING:
    import grpc
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

__all__ = ["Tracing", "TracingMode", "context_metadata", "span", "tracing_mode"]

TracingMode = Literal["off", "console", "otlp"]
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACER_NAME = "lossd.server"

_NOOP: AbstractContextManager[object] = nullcontext()
_tracer: Tracer | None = None  # set by Tracing.install, for the server's own spans


def span(name: str) -> AbstractContextManager[object]:
    """A child span of the current one while tracing is installed; a no-op otherwise."""
    tracer = _tracer
    return _NOOP if tracer is None else tracer.start_as_current_span(name)


def context_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (``traceparent``...) while tracing is installed; () otherwise."""
    if _tracer is None:
        return ()
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple(carrier.items())


def tracing_mode(settings: Settings, environ: Mapping[str, str]) -> TracingMode:
    """``settings.tracing`` when set; else otlp when an OTLP endpoint variable is set, off otherwise."""
    if settings.tracing is not None:
        return settings.tracing
    return "otlp" if any(environ.get(name) for name in OTLP_ENDPOINT_VARIABLES) else "off"


def _kernel_span_factory(tracer: Tracer) -> Any:
    def open_span(name: str, attributes: Mapping[str, str]) -> AbstractContextManager[object]:
        return tracer.start_as_current_span(name, attributes=dict(attributes))

    return open_span


class Tracing:
    """One tracer provider and the instrumentations that use it (no global OpenTelemetry state is set)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(TRACER_NAME)

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str]) -> Tracing | None:
        """The tracing ``settings`` and the environment ask for, or None when it is off."""
        mode = tracing_mode(settings, environ)
        if mode == "off":
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
        except ImportError as exc:
            raise ValueError(f"tracing={mode} needs the OpenTelemetry packages: install lossd-server[tracing] ({exc})") from None
        exporter: SpanExporter
        if mode == "console":
            exporter = ConsoleSpanExporter(out=sys.stdout)  # the stdout of now (its default is import time's)
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, TLS: the standard OTEL_EXPORTER_OTLP_* variables
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the default name.
        provider = TracerProvider(resource=Resource.create({"service.name": "lossd"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))  # exported off the request path
        return cls(provider)

    def install(self) -> None:
        """Open lossd's own spans (decode, update, finalize) under this provider."""
        global _tracer
        _tracer = self.tracer
        set_span_factory(_kernel_span_factory(self.tracer))

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """The official aio server interceptor: a span per call, parented by the caller's ``traceparent``."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        return interceptor

    def instrument_app(self, app: FastAPI) -> None:
        """A span per gateway request; its backend call carries the ``traceparent`` (see annotate_gateway_request)."""
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider, excluded_urls="healthz,readyz,metrics")

    def shutdown(self) -> None:
        """Stop opening spans and flush the ones not exported yet."""
        global _tracer
        if _tracer is self.tracer:
            _tracer = None
            set_span_factory(None)
        self.provider.shutdown()
