"""The HTTP gateway against real gRPC backends on port 0: values, errors as problem details, failover."""

from __future__ import annotations

import base64
import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from replica import Replica

from lossd.client.codec import encode_tensor
from lossd.client.results import response_to_json
from lossd.client.specs import spec_to_proto
from lossd.server.gateway.problems import _GRPC_TO_HTTP, problem_from_rpc_error
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

FUNCTIONS: list[Any] = [
    "cross_entropy",
    "ece:n_bins=10",
    {"name": "cross_entropy", "params": {"label_smoothing": 0.1}, "alias": "ce_ls"},
    "accuracy",
    "reliability_diagram:n_bins=5",
]


@pytest.fixture(scope="module")
def replica() -> Iterator[Replica]:
    r = Replica().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def http(replica: Replica) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=replica.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 64)
    logits = rng.normal(size=(64, 5)).astype(np.float32)
    logits[np.arange(64), labels] += 1.0
    return {"logits": logits, "labels": labels.astype(np.int64)}


def _nested(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}


def _b64(a: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    return {"dtype": dtype or str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}


def _grpc(address: str, tensors: dict[str, np.ndarray], functions: list[Any]) -> dict[str, Any]:
    with grpc.insecure_channel(address) as channel:
        request = pb.EvaluateRequest(
            tensors={k: encode_tensor(v, k) for k, v in tensors.items()}, functions=[spec_to_proto(f) for f in functions]
        )
        return response_to_json(pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=60))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail", "errors"} <= set(body) and body["status"] == status
    return body


def _fields(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body["errors"]]


# -- values --------------------------------------------------------------------------------------


def test_nested_lists_and_base64_give_the_grpc_values(http: httpx.Client, replica: Replica, batch: dict[str, np.ndarray]) -> None:
    expected = _grpc(replica.grpc_address, batch, FUNCTIONS)
    nested = http.post("/v1/evaluate", json={"tensors": {k: _nested(v) for k, v in batch.items()}, "functions": FUNCTIONS})
    b64 = http.post("/v1/evaluate", json={"tensors": {k: _b64(v) for k, v in batch.items()}, "functions": FUNCTIONS})
    assert nested.status_code == 200 and b64.status_code == 200, nested.text + b64.text
    assert nested.json() == expected
    assert b64.json() == expected
    assert set(expected["results"]) == {"cross_entropy", "ece", "ce_ls", "accuracy", "reliability_diagram"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_dtypes(http: httpx.Client, replica: Replica, batch: dict[str, np.ndarray], dtype: str) -> None:
    import ml_dtypes

    logits = batch["logits"].astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    tensors = {"logits": logits, "labels": batch["labels"]}
    expected = _grpc(replica.grpc_address, tensors, ["cross_entropy"])
    as_b64 = http.post(
        "/v1/evaluate", json={"tensors": {"logits": _b64(logits, dtype), "labels": _b64(batch["labels"])}, "functions": ["cross_entropy"]}
    )
    as_list = http.post(
        "/v1/evaluate",
        json={
            "tensors": {"logits": {**_nested(logits.astype(np.float64)), "dtype": dtype}, "labels": _nested(batch["labels"])},
            "functions": ["cross_entropy"],
        },
    )
    assert as_b64.json() == expected and as_list.json() == expected


def test_tags_reach_monitoring_and_the_dashboard(http: httpx.Client, replica: Replica, batch: dict[str, np.ndarray]) -> None:
    body = {
        "tensors": {k: _b64(v) for k, v in batch.items()},
        "functions": ["cross_entropy"],
        "tags": {"model": "gw-model", "dataset": "gw-data", "split": "val"},
    }
    assert http.post("/v1/evaluate", json=body).status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'lossd_loss_denominator_total{dataset="gw-data",function="cross_entropy",model="gw-model",split="val"} 64.0' in text
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Evaluate",grpc_service="lossd.v1.LossService",grpc_type="unary"}' in text
    assert 'lossd_http_requests_total{code="200",handler="/v1/evaluate",method="POST"}' in text
    history = http.get("/v1/history").json()
    series = [s for s in history["series"] if s["model"] == "gw-model"]
    assert len(series) == 1 and series[0]["summary"]["count"] == 64
    page = http.get("/dashboard")
    assert page.status_code == 200 and "static/dashboard.js" in page.text
    assert http.get("/static/dashboard.js").status_code == 200


def test_grpc_metrics_carry_type_code_and_message_counts(http: httpx.Client, replica: Replica, batch: dict[str, np.ndarray]) -> None:
    """go-grpc-prometheus semantics from the interceptor: a failed unary call and a client stream."""
    with grpc.insecure_channel(replica.grpc_address) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Evaluate(pb.EvaluateRequest(functions=[spec_to_proto("no_such_function")]), timeout=30)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        tensors = {k: encode_tensor(v, k) for k, v in batch.items()}
        messages = [pb.EvaluateRequest(tensors=tensors, functions=[spec_to_proto("cross_entropy")])] + [
            pb.EvaluateRequest(tensors=tensors)
        ] * 2
        stub.EvaluateStream(iter(messages), timeout=30)
    text = http.get("/metrics").text
    service = 'grpc_method="{}",grpc_service="lossd.v1.LossService",grpc_type="{}"'
    assert f'grpc_server_handled_total{{grpc_code="INVALID_ARGUMENT",{service.format("Evaluate", "unary")}}}' in text
    assert f'grpc_server_handled_total{{grpc_code="OK",{service.format("EvaluateStream", "client_stream")}}} 1.0' in text
    assert f"grpc_server_msg_received_total{{{service.format('EvaluateStream', 'client_stream')}}} 3.0" in text
    assert f"grpc_server_handling_seconds_count{{{service.format('EvaluateStream', 'client_stream')}}} 1.0" in text
    assert 'lossd_grpc_in_flight_requests{grpc_method="EvaluateStream",grpc_service="lossd.v1.LossService"} 0.0' in text


def test_catalogue_health_and_docs(http: httpx.Client) -> None:
    functions = http.get("/v1/functions").json()
    names = {f["name"] for f in functions["functions"]}
    assert {"cross_entropy", "ece"} <= names
    calibration = http.get("/v1/functions", params={"family": "calibration"}).json()
    assert calibration["functions"] and all(f["family"] == "calibration" for f in calibration["functions"])
    assert _fields(_problem(http.get("/v1/functions", params={"family": "nope"}), 400)) == ["family"]
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["status"] == "ready" and list(ready["backends"].values()) == ["SERVING"]
    assert http.get("/docs").status_code == 200
    assert "/v1/evaluate" in http.get("/openapi.json").json()["paths"]


# -- errors ----------------------------------------------------------------------------------------


def _body(batch: dict[str, np.ndarray], **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"tensors": {k: _b64(v) for k, v in batch.items()}, "functions": ["cross_entropy"]}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"functions": ["no_such_function"]}, "functions[0].name"),
        ({"functions": [{"name": "cross_entropy", "params": {"label_smoothing": 2}}]}, "functions[0].params.label_smoothing"),
        ({"functions": ["ece:n_bins"]}, "functions[0]"),
        ({"functions": []}, "functions"),
        ({"tensors": {"logits": {"dtype": "float32", "shape": [64, 5], "data": [[1.0, 2.0]]}}}, "tensors.logits.data"),
        ({"tensors": {"logits": {"dtype": "float32", "shape": [64, 5], "b64": "***"}}}, "tensors.logits.b64"),
        ({"tensors": {"logits": {"dtype": "float32", "shape": [64, 6], "b64": base64.b64encode(b"\0" * 16).decode()}}}, "tensors.logits"),
        (
            {
                "tensors": {
                    "logits": {"dtype": "float32", "shape": [2, 2], "data": [[0, 1], [1, 0]]},
                    "labels": {"dtype": "int64", "shape": [2], "data": [0, 7]},
                }
            },
            "tensors.labels",
        ),
        (
            {
                "tensors": {
                    "logits": {"dtype": "float32", "shape": [1, 2], "data": [[0, 1]]},
                    "labels": {"dtype": "int64", "shape": [1], "data": [0.5]},
                }
            },
            "tensors.labels.data",
        ),
    ],
    ids=[
        "unknown-function",
        "bad-param",
        "bad-spec",
        "no-functions",
        "ragged-shape",
        "bad-base64",
        "byte-length",
        "label-range",
        "non-integer-label",
    ],
)
def test_invalid_argument_is_400_naming_the_field(
    http: httpx.Client, batch: dict[str, np.ndarray], change: dict[str, Any], field: str
) -> None:
    body = _problem(http.post("/v1/evaluate", json=_body(batch, **change)), 400)
    assert field in _fields(body), body
    assert body["type"] == "urn:lossd:problem:invalid-argument"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tensors": {"x": {"dtype": "float33", "shape": [1], "data": [1]}}, "functions": ["mse"]}, "tensors.x.dtype"),
        ({"tensors": {}}, "functions"),
        ({"tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1], "b64": "AAAA"}}, "functions": ["mse"]}, "tensors.x"),
        ({"tensors": {"x": {"dtype": "float32", "shape": [-1], "data": []}}, "functions": ["mse"]}, "tensors.x"),
        ({"tensors": {}, "functions": [{"name": "mse", "extra": 1}]}, "functions[0].extra"),
        ({"tensors": {}, "functions": ["mse"], "tags": {"model": 3}}, "tags.model"),
    ],
    ids=["dtype", "missing-functions", "data-and-b64", "negative-shape", "unknown-spec-key", "tag-type"],
)
def test_schema_errors_are_400_naming_the_field(http: httpx.Client, body: dict[str, Any], field: str) -> None:
    problem = _problem(http.post("/v1/evaluate", json=body), 400)
    assert field in _fields(problem), problem


def test_malformed_json_is_400_naming_the_body(http: httpx.Client) -> None:
    problem = _problem(http.post("/v1/evaluate", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert problem["errors"][0]["field"] == "body"


def test_float_data_beyond_the_dtype_range_is_refused(http: httpx.Client) -> None:
    body = {
        "tensors": {
            "logits": {"dtype": "float32", "shape": [1, 2], "data": [[1e39, 0.0]]},
            "labels": {"dtype": "int64", "shape": [1], "data": [0]},
        },
        "functions": ["cross_entropy"],
    }
    problem = _problem(http.post("/v1/evaluate", json=body), 400)
    assert problem["errors"][0]["field"] == "tensors.logits.data" and "outside the range of float32" in problem["errors"][0]["description"]


def test_a_tensor_no_function_reads_and_json_booleans_as_numbers_are_refused(http: httpx.Client) -> None:
    tensors = {
        "logits": {"dtype": "float32", "shape": [1, 2], "data": [[1.0, 0.0]]},
        "labels": {"dtype": "int64", "shape": [1], "data": [0]},
    }
    misspelt = {"tensors": {**tensors, "weight": {"dtype": "float32", "shape": [1], "data": [2.0]}}, "functions": ["cross_entropy"]}
    (error,) = _problem(http.post("/v1/evaluate", json=misspelt), 400)["errors"]
    assert error["field"] == "tensors.weight" and "did you mean 'weights'?" in error["description"]
    boolean = {"tensors": {**tensors, "labels": {"dtype": "int64", "shape": [1], "data": [True]}}, "functions": ["cross_entropy"]}
    (error,) = _problem(http.post("/v1/evaluate", json=boolean), 400)["errors"]
    assert error["field"] == "tensors.labels.data" and "JSON boolean at data[0]" in error["description"]


def test_empty_nested_list_takes_any_empty_shape(http: httpx.Client) -> None:
    body = {
        "tensors": {"logits": {"dtype": "float32", "shape": [0, 4], "data": []}, "labels": {"dtype": "int64", "shape": [0], "data": []}},
        "functions": ["cross_entropy"],
    }
    response = http.post("/v1/evaluate", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["results"]["cross_entropy"] is None  # NaN: nothing evaluated


def test_unknown_route_is_a_problem(http: httpx.Client) -> None:
    _problem(http.get("/v2/nothing"), 404)


def test_oversize_body_is_413(replica: Replica, batch: dict[str, np.ndarray]) -> None:
    small = Replica(backends=[replica.grpc_address], max_body_bytes=2000).start()
    try:
        body = _body(batch)
        with httpx.Client(base_url=small.url, timeout=60) as client:
            by_length = _problem(client.post("/v1/evaluate", json=body), 413)
            assert "max_body_bytes" in by_length["detail"]

            def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
                payload = httpx.Request("POST", "/", json=body).content
                for i in range(0, len(payload), 500):
                    yield payload[i : i + 500]

            _problem(client.post("/v1/evaluate", content=chunks(), headers={"content-type": "application/json"}), 413)
            small_body = {"tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1.0]}}, "functions": ["mse"]}
            assert client.post("/v1/evaluate", json=small_body).status_code == 400  # under the limit: reaches the backend
    finally:
        small.stop()


def test_message_over_the_backend_limit_is_413(batch: dict[str, np.ndarray]) -> None:
    tiny = Replica(max_message_bytes=1000).start()
    try:
        with httpx.Client(base_url=tiny.url, timeout=60) as client:
            problem = _problem(client.post("/v1/evaluate", json=_body(batch)), 413)
            assert problem["grpc_code"] == "RESOURCE_EXHAUSTED"
    finally:
        tiny.stop()


def test_backend_down_is_503_and_not_ready(batch: dict[str, np.ndarray]) -> None:
    gateway = Replica(backends=[f"127.0.0.1:{_free_port()}"], request_timeout_seconds=10).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            problem = _problem(client.post("/v1/evaluate", json=_body(batch)), 503)
            assert problem["grpc_code"] == "UNAVAILABLE" and client.post("/v1/evaluate", json=_body(batch)).headers["retry-after"] == "1"
            assert client.get("/healthz").status_code == 200
            not_ready = _problem(client.get("/readyz"), 503)
            assert list(not_ready["backends"].values()) == ["UNREACHABLE"]
    finally:
        gateway.stop()


def test_deadline_is_504(replica: Replica, batch: dict[str, np.ndarray]) -> None:
    gateway = Replica(backends=[replica.grpc_address], request_timeout_seconds=1e-6).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            problem = _problem(client.post("/v1/evaluate", json=_body(batch)), 504)
            assert problem["grpc_code"] == "DEADLINE_EXCEEDED"
    finally:
        gateway.stop()


def test_an_overloaded_replica_is_503_with_its_retry_after(batch: dict[str, np.ndarray]) -> None:
    """RESOURCE_EXHAUSTED with RetryInfo is an overloaded replica, not an oversize request: retry later, not never."""
    busy = Replica(max_concurrent_requests=1, retry_after_seconds=3.0).start()
    release = threading.Event()

    def held() -> Iterator[pb.EvaluateRequest]:
        release.wait(30)  # the stream holds the replica's one slot until then
        yield from ()

    channel = grpc.insecure_channel(busy.grpc_address)
    stream = pb_grpc.LossServiceStub(channel).EvaluateStream.future(held())
    try:
        with httpx.Client(base_url=busy.url, timeout=60) as client:
            for _ in range(100):  # until the stream has its slot
                response = client.post("/v1/evaluate", json=_body(batch))
                if response.status_code != 200:
                    break
                time.sleep(0.05)
            problem = _problem(response, 503)
        assert problem["grpc_code"] == "RESOURCE_EXHAUSTED" and problem["type"] == "urn:lossd:problem:overloaded"
        assert "max_concurrent_requests" in problem["detail"]
        assert 1.5 <= problem["retry_after_seconds"] <= 4.5  # the replica's hint, jittered ±50%
        assert response.headers["retry-after"] == str(math.ceil(problem["retry_after_seconds"]))
    finally:
        release.set()
        with contextlib.suppress(grpc.RpcError):
            stream.result(30)
        channel.close()
        busy.stop()


class _FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name)
def test_every_grpc_status_maps_to_an_http_status(code: grpc.StatusCode) -> None:
    assert code in _GRPC_TO_HTTP
    problem = problem_from_rpc_error(_FakeError(code))
    expected = {"INVALID_ARGUMENT": 400, "RESOURCE_EXHAUSTED": 413, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}
    assert problem.status == expected.get(code.name, problem.status)
    assert 400 <= problem.status < 600 and problem.extra["grpc_code"] == code.name


# -- several backends ------------------------------------------------------------------------------


def test_round_robin_and_failover(replica: Replica, batch: dict[str, np.ndarray]) -> None:
    second = Replica().start()
    dead = f"127.0.0.1:{_free_port()}"
    gateway = Replica(backends=[dead, replica.grpc_address, second.grpc_address]).start()
    try:
        counts_before = [_evaluations(r) for r in (replica, second)]
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            for _ in range(12):
                response = client.post("/v1/evaluate", json=_body(batch))
                assert response.status_code == 200, response.text
            dead_backend = gateway.app.state.pool.backends[0]
            assert dead_backend.failures == 1  # tried once, then skipped while marked down
            ready = client.get("/readyz").json()
        served = [_evaluations(r) - before for r, before in zip((replica, second), counts_before, strict=True)]
        assert sum(served) == 12 and min(served) >= 4, served  # both live replicas take turns
        assert ready["backends"] == {dead: "UNREACHABLE", replica.grpc_address: "SERVING", second.grpc_address: "SERVING"}
    finally:
        gateway.stop()
        second.stop()


def _evaluations(r: Replica) -> float:
    assert r.monitoring is not None
    assert r.monitoring.worker.flush_sync(10)  # the monitoring thread counts after the responses (as /metrics does, wait for it)
    return sum(s.value for f in r.monitoring.registry.collect() for s in f.samples if s.name == "lossd_evaluations_total")


def test_a_stream_is_monitored_batch_by_batch() -> None:
    """Calibration counters of a multi-batch stream cover every batch, not just the last one."""
    from lossd.client import Client

    rng = np.random.default_rng(5)
    batches = [{"logits": rng.standard_normal((n, 4), dtype=np.float32), "labels": rng.integers(0, 4, n)} for n in (7, 13, 1)]
    replica = Replica().start()
    try:
        with Client(replica.grpc_address) as client:
            client.evaluate_stream(batches, ["cross_entropy"], tags={"model": "streamed"})
        text = httpx.get(f"{replica.url}/metrics").text
    finally:
        replica.stop()
    counts = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("lossd_calibration_predictions_total") and 'model="streamed"' in line
    ]
    assert sum(counts) == 21
