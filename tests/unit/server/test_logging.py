"""JSON request logs: one line per gRPC call and gateway request, parsed and checked field by field."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from lossd.client.codec import encode_tensor
from lossd.server.app import create_server
from lossd.server.gateway import create_app
from lossd.server.monitoring import Monitoring
from lossd.server.observability import REQUEST_LOGGER
from lossd.server.observability.logging import json_formatter
from lossd.server.observability.wiring import instrument_gateway
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

EVALUATE = "/lossd.v1.LossService/Evaluate"
GENERATED_ID = re.compile(r"^[0-9a-f]{12}$")
TOKEN = "s3cret-token-value"


@pytest.fixture
def lines() -> Iterator[list[dict[str, Any]]]:
    """The lossd.requests lines written during the test, each parsed from its JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger(REQUEST_LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    parsed: list[dict[str, Any]] = []
    yield parsed
    logger.removeHandler(handler)
    logger.setLevel(level)


def _parse(stream_lines: list[dict[str, Any]]) -> None:
    handler = next(h for h in logging.getLogger(REQUEST_LOGGER).handlers if isinstance(h, logging.StreamHandler))
    text = handler.stream.getvalue()
    stream_lines[:] = [json.loads(line) for line in text.splitlines()]


def _request(request_id: str = "", targets: np.ndarray | None = None) -> pb.EvaluateRequest:
    preds = np.array([0.5, 1.5, 2.0, 4.0], dtype=np.float32)
    targets = np.array([1.0, 1.0, 2.0, 3.0], dtype=np.float32) if targets is None else targets
    return pb.EvaluateRequest(
        tensors={"predictions": encode_tensor(preds, "predictions"), "targets": encode_tensor(targets, "targets")},
        functions=[pb.FunctionSpec(name="mse"), pb.FunctionSpec(name="mae", alias="l1")],
        tags=pb.Tags(model="m1", dataset="d1", split="val", extra={"step": "7"}),
        request_id=request_id,
    )


def _settings(**overrides: Any) -> Settings:
    return Settings(**{"grpc_port": 0, "http_port": 0, "device": "cpu", "log_format": "json", **overrides})


def _serve(settings: Settings, body: Callable[[pb_grpc.LossServiceStub, str], Awaitable[None]]) -> None:
    async def main() -> None:
        running = await create_server(settings)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                await body(pb_grpc.LossServiceStub(channel), running.address)
        finally:
            await running.stop(0)

    asyncio.run(main())


def _only(lines: list[dict[str, Any]], kind: str = "grpc") -> dict[str, Any]:
    _parse(lines)
    mine = [line for line in lines if line["kind"] == kind]
    assert len(mine) == 1, lines
    return mine[0]


def test_a_successful_evaluate_is_one_line_with_every_field(lines: list[dict[str, Any]]) -> None:
    request = _request("req-42")
    answers: list[pb.EvaluateResponse] = []

    async def call(stub: pb_grpc.LossServiceStub, address: str) -> None:
        answers.append(await stub.Evaluate(request, timeout=30))

    _serve(_settings(), call)
    line = _only(lines)
    assert line["logger"] == REQUEST_LOGGER and line["level"] == "INFO" and line["message"] == "request"
    assert line["request_id"] == "req-42" == answers[0].request_id
    assert line["method"] == EVALUATE and line["status"] == "OK"
    assert line["tags"] == {"model": "m1", "dataset": "d1", "split": "val", "extra": {"step": "7"}}
    assert line["functions"] == ["mse", "l1"]
    assert line["bytes_in"] == request.ByteSize() > 32  # two float32 tensors of 4 elements, at least
    assert line["bytes_out"] == answers[0].ByteSize() > 0
    assert 0 < line["duration_seconds"] < 30
    assert "caller" not in line  # no tokens on this server
    assert set(line) >= {"time"}


def test_a_failed_evaluate_is_logged_with_its_code_and_a_generated_id(lines: list[dict[str, Any]]) -> None:
    request = _request("", targets=np.ones(3, dtype=np.float32))  # 4 preds, 3 targets
    codes: list[grpc.StatusCode] = []

    async def call(stub: pb_grpc.LossServiceStub, address: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Evaluate(request, timeout=30)
        codes.append(failed.value.code())

    _serve(_settings(), call)
    line = _only(lines)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT]
    assert line["status"] == "INVALID_ARGUMENT" and line["method"] == EVALUATE
    assert GENERATED_ID.match(line["request_id"]), line["request_id"]
    assert line["bytes_in"] == request.ByteSize() and line["bytes_out"] == 0
    assert line["functions"] == ["mse", "l1"] and line["tags"]["model"] == "m1"


def test_a_generated_id_is_echoed_in_the_response(lines: list[dict[str, Any]]) -> None:
    answers: list[pb.EvaluateResponse] = []

    async def call(stub: pb_grpc.LossServiceStub, address: str) -> None:
        answers.append(await stub.Evaluate(_request(""), timeout=30))

    _serve(_settings(), call)
    line = _only(lines)
    assert GENERATED_ID.match(answers[0].request_id) and line["request_id"] == answers[0].request_id


def test_the_caller_is_named_and_the_token_never_written(lines: list[dict[str, Any]], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci-runner:{TOKEN}\n")
    codes: list[grpc.StatusCode] = []

    async def call(stub: pb_grpc.LossServiceStub, address: str) -> None:
        await stub.Evaluate(_request("with-token"), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Evaluate(_request("no-token"), timeout=30)
        codes.append(refused.value.code())

    _serve(_settings(auth_tokens_file=tokens), call)
    _parse(lines)
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["with-token"]["caller"] == "ci-runner" and by_id["with-token"]["status"] == "OK"
    assert codes == [grpc.StatusCode.UNAUTHENTICATED]
    assert by_id["no-token"]["status"] == "UNAUTHENTICATED" and "caller" not in by_id["no-token"]
    assert all(TOKEN not in json.dumps(line) for line in lines)


def test_text_format_writes_no_request_lines(lines: list[dict[str, Any]]) -> None:
    async def call(stub: pb_grpc.LossServiceStub, address: str) -> None:
        await stub.Evaluate(_request("quiet"), timeout=30)

    _serve(_settings(log_format="text"), call)
    _parse(lines)
    assert lines == []


def test_a_gateway_request_is_one_http_line_sharing_its_id_with_the_grpc_line(lines: list[dict[str, Any]]) -> None:
    settings = _settings()
    body = {
        "tensors": {
            "predictions": {"dtype": "float32", "shape": [3], "data": [0.5, 1.5, 2.0]},
            "targets": {"dtype": "float32", "shape": [3], "data": [1.0, 1.0, 2.0]},
        },
        "functions": ["mse"],
        "tags": {"model": "gw-model"},
    }
    answers: list[httpx.Response] = []

    async def call(stub: pb_grpc.LossServiceStub, address: str) -> None:
        app = create_app(settings, backends=[address], monitoring=Monitoring(settings))
        instrument_gateway(app, settings, None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            answers.append(await client.post("/v1/evaluate", json=body, headers={"x-request-id": "http-7"}))
            answers.append(await client.post("/v1/evaluate", json={**body, "functions": ["no_such_function"]}))
        await app.state.pool.close()

    _serve(settings, call)
    ok, bad = answers
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "http-7"
    assert bad.status_code == 400 and GENERATED_ID.match(bad.headers["x-request-id"])
    _parse(lines)
    http = {line["request_id"]: line for line in lines if line["kind"] == "http"}
    grpc_lines = {line["request_id"]: line for line in lines if line["kind"] == "grpc"}
    line = http["http-7"]
    assert line["method"] == "POST /v1/evaluate" and line["status"] == 200
    assert line["tags"] == {"model": "gw-model"} and line["functions"] == ["mse"]
    assert line["bytes_in"] == len(ok.request.content) and line["bytes_out"] == len(ok.content)
    assert 0 < line["duration_seconds"] < 30
    assert grpc_lines["http-7"]["status"] == "OK" and grpc_lines["http-7"]["tags"] == {"model": "gw-model"}
    failed = http[bad.headers["x-request-id"]]
    assert failed["status"] == 400 and failed["bytes_out"] == len(bad.content)
