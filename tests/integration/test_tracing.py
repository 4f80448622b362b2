"""OpenTelemetry traces: a client span's traceparent parents the server span; decode, update and finalize are its children."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from lossd.client.codec import encode_tensor
from lossd.kernels.spans import function_span
from lossd.server.app import create_server
from lossd.server.observability.tracing import Tracing, span, tracing_mode
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def server_spans() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    provider, exporter = _provider()
    tracing = Tracing(provider)
    tracing.install()
    yield tracing, exporter
    tracing.shutdown()


def _request() -> pb.EvaluateRequest:
    preds, targets = np.array([0.5, 1.5, 2.0], dtype=np.float32), np.array([1.0, 1.0, 2.0], dtype=np.float32)
    return pb.EvaluateRequest(
        tensors={"predictions": encode_tensor(preds, "predictions"), "targets": encode_tensor(targets, "targets")},
        functions=[pb.FunctionSpec(name="mse"), pb.FunctionSpec(name="mae", alias="l1")],
    )


def test_the_client_trace_continues_on_the_server_with_decode_update_finalize(
    server_spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = server_spans
    client_provider, client_exporter = _provider()

    async def main() -> pb.EvaluateResponse:
        running = await create_server(Settings(grpc_port=0, http_port=0, device="cpu"), tracing=tracing)
        try:
            # What a user enables on their side: the official client interceptors send `traceparent`.
            interceptors = aio_client_interceptors(tracer_provider=client_provider)
            async with grpc.aio.insecure_channel(running.address, interceptors=interceptors) as channel:
                with client_provider.get_tracer("test").start_as_current_span("training-step"):
                    response: pb.EvaluateResponse = await pb_grpc.LossServiceStub(channel).Evaluate(_request(), timeout=30)
                    return response
        finally:
            await running.stop(0)

    response = asyncio.run(main())
    assert set(response.results[0].values) >= {"value"}
    client = {s.name: s for s in client_exporter.get_finished_spans()}
    step, client_call = client["training-step"], client["/lossd.v1.LossService/Evaluate"]
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "/lossd.v1.LossService/Evaluate"
    assert server.context is not None and client_call.context is not None and step.context is not None
    assert server.context.trace_id == step.context.trace_id  # one trace from the caller to compute
    assert server.parent is not None and server.parent.span_id == client_call.context.span_id and server.parent.is_remote

    def children(name: str) -> list[ReadableSpan]:
        found = [s for s in spans if s.name == name]
        assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in found), name
        return found

    assert len(children("lossd.decode")) == 1
    for phase in ("lossd.update", "lossd.finalize"):
        assert sorted((str(s.attributes["lossd.function"]), str(s.attributes["lossd.alias"])) for s in children(phase)) == [  # type: ignore[index]
            ("mae", "l1"),
            ("mse", "mse"),
        ]
    update = {str(s.attributes["lossd.alias"]): s for s in children("lossd.update")}  # type: ignore[index]
    finalize = {str(s.attributes["lossd.alias"]): s for s in children("lossd.finalize")}  # type: ignore[index]
    assert all(update[a].end_time <= finalize[a].start_time for a in update)  # type: ignore[operator]


def test_tracing_is_off_by_default_and_costs_a_shared_no_op() -> None:
    settings = Settings(device="cpu")
    assert tracing_mode(settings, {}) == "off" and Tracing.from_settings(settings, {}) is None
    assert tracing_mode(settings, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == "otlp"
    assert tracing_mode(Settings(device="cpu", tracing="off"), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == "off"
    assert tracing_mode(Settings(device="cpu", tracing="console"), {}) == "console"
    assert span("a") is span("b")  # nothing is allocated per call when tracing is off
    assert function_span("update", "mse", "mse") is function_span("finalize", "mae", "l1")


def test_console_tracing_prints_the_server_span(capsys: pytest.CaptureFixture[str]) -> None:
    tracing = Tracing.from_settings(Settings(device="cpu", tracing="console"), {})
    assert tracing is not None
    tracing.install()

    async def main() -> None:
        running = await create_server(Settings(grpc_port=0, http_port=0, device="cpu"), tracing=tracing)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                await pb_grpc.LossServiceStub(channel).Evaluate(_request(), timeout=30)
        finally:
            await running.stop(0)

    try:
        asyncio.run(main())
    finally:
        tracing.shutdown()  # flushes the batch processor
    out = capsys.readouterr().out
    assert '"name": "/lossd.v1.LossService/Evaluate"' in out and '"name": "lossd.update"' in out and '"name": "lossd.decode"' in out
