"""EvaluateStream against clients that misbehave: streams left idle, later messages that change the stream's fields."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from integration.conftest import ServerThread, start_server

from helpers import assert_close
from lossd.client import Client, InvalidArgumentError
from lossd.client.codec import encode_tensor
from lossd.client.errors import from_rpc_error
from lossd.server import service as service_module
from lossd.server.monitoring.events import EvaluationEvent
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

N, K = 32, 5
IDLE_SECONDS = 1.0


@pytest.fixture(scope="module")
def events() -> list[EvaluationEvent]:
    return []


@pytest.fixture(scope="module")
def server(events: list[EvaluationEvent]) -> Iterator[ServerThread]:
    """A server of its own: one admission slot, streams ended after 1 s without a message."""
    s = start_server(subscribers=[events.append], stream_idle_seconds=IDLE_SECONDS, max_concurrent_requests=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((N, K)).astype(np.float32), "labels": rng.integers(0, K, N)}


def message(seed: int = 0, **fields: Any) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(tensors={k: encode_tensor(v, k) for k, v in arrays(seed).items()}, **fields)


def first_message(**fields: Any) -> pb.EvaluateRequest:
    return message(0, functions=[pb.FunctionSpec(name="cross_entropy")], **fields)


def stalled(messages: list[pb.EvaluateRequest], release: threading.Event) -> Iterator[pb.EvaluateRequest]:
    """``messages``, then neither another message nor the half-close until ``release`` is set."""
    yield from messages
    release.wait(60)


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- idle streams (setting stream_idle_seconds) --


@pytest.mark.parametrize("sent", [1, 0], ids=["after-one-message", "before-any-message"])
def test_an_idle_stream_is_ended_and_frees_its_slot(stub: pb_grpc.LossServiceStub, events: list[EvaluationEvent], sent: int) -> None:
    release = threading.Event()
    start = time.monotonic()
    future = stub.EvaluateStream.future(stalled([first_message()][:sent], release))
    try:
        time.sleep(0.3)
        busy = status_of(lambda: stub.Evaluate(first_message(), timeout=10))  # the stream holds the only slot
        assert busy.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, busy
        ended = status_of(lambda: future.result(timeout=20))
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert ended.code() is grpc.StatusCode.DEADLINE_EXCEEDED, ended
    assert "no stream message for 1 s" in ended.details()
    assert "stream_idle_seconds" in ended.details() and "LOSSD_STREAM_IDLE_SECONDS" in ended.details()
    assert IDLE_SECONDS * 0.9 <= elapsed < IDLE_SECONDS + 4, elapsed
    response = stub.Evaluate(first_message(), timeout=10)  # the slot is free again
    assert response.results[0].alias == "cross_entropy"
    if sent:  # monitoring forgets the stream's messages, as for any failed stream
        assert events[-2].method == "EvaluateStream" and events[-2].aborted, events[-2]


def test_a_stream_with_pauses_shorter_than_the_limit_completes(stub: pb_grpc.LossServiceStub) -> None:
    def paced() -> Iterator[pb.EvaluateRequest]:
        yield first_message()
        for seed in (1, 2, 3):  # 2.1 s in all, never 1 s without a message
            time.sleep(0.7)
            yield message(seed)

    response = stub.EvaluateStream(paced(), timeout=30)
    assert response.results[0].denominator == 4 * N


def test_computing_a_message_is_not_idle_time(stub: pb_grpc.LossServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages that take the server longer than the limit to add: only the wait for the client counts."""
    add = service_module._add_stream_message

    def slow_add(*args: Any) -> Any:
        time.sleep(IDLE_SECONDS * 1.5)  # on the compute thread, as a large message would be
        return add(*args)

    monkeypatch.setattr(service_module, "_add_stream_message", slow_add)
    response = stub.EvaluateStream(iter([first_message(), message(1)]), timeout=30)
    assert response.results[0].denominator == 2 * N


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_STREAM_IDLE_SECONDS", "2.5")
    assert Settings().stream_idle_seconds == 2.5
    assert Settings.model_fields["stream_idle_seconds"].default == 300.0
    monkeypatch.setenv("LOSSD_STREAM_IDLE_SECONDS", "0")
    with pytest.raises(ValueError, match="stream_idle_seconds"):
        Settings()


# -- later messages repeat the first's stream-level fields or leave them unset --

TAGS = pb.Tags(model="a", extra={"step": "1"})

REFUSED = {
    "other tags": ({"tags": TAGS}, {"tags": pb.Tags(model="b", extra={"step": "2"})}, "tags", "tags of the first message"),
    "tags after none": ({}, {"tags": pb.Tags(model="b")}, "tags", "tags of the first message"),
    "unknown nan_policy": ({}, {"nan_policy": 99}, "nan_policy", "NAN_POLICY_PROPAGATE (or unset), got 99"),
    "other nan_policy": (
        {"nan_policy": pb.NAN_POLICY_OMIT},
        {"nan_policy": pb.NAN_POLICY_RAISE},
        "nan_policy",
        "NAN_POLICY_OMIT (or unset), got NAN_POLICY_RAISE",
    ),
    "return_state": ({}, {"return_state": True}, "return_state", "false (or unset), got true"),
    "request_id": ({"request_id": "a"}, {"request_id": "b"}, "request_id", "'a' (or unset), got 'b'"),
}


@pytest.mark.parametrize(("first", "later", "field", "fragment"), REFUSED.values(), ids=REFUSED.keys())
def test_a_later_message_changing_a_stream_field_is_refused(
    stub: pb_grpc.LossServiceStub, first: dict[str, Any], later: dict[str, Any], field: str, fragment: str
) -> None:
    error = status_of(lambda: stub.EvaluateStream(iter([first_message(**first), message(1, **later)]), timeout=30))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    exc = from_rpc_error(error)
    assert isinstance(exc, InvalidArgumentError)
    (violation,) = exc.violations
    assert violation.field == f"messages[1].{field}"
    assert fragment in violation.description, violation.description


def test_every_changed_field_of_a_message_is_named(stub: pb_grpc.LossServiceStub) -> None:
    later = message(
        1,
        functions=[pb.FunctionSpec(name="accuracy")],
        tags=pb.Tags(model="b"),
        nan_policy=99,
        return_state=True,
        request_id="b",
    )
    messages = [first_message(tags=TAGS, request_id="a"), message(1), later]
    exc = from_rpc_error(status_of(lambda: stub.EvaluateStream(iter(messages), timeout=30)))
    assert isinstance(exc, InvalidArgumentError)
    names = ["functions", "tags", "nan_policy", "return_state", "request_id"]
    assert [v.field for v in exc.violations] == [f"messages[2].{n}" for n in names]


ACCEPTED = {
    "unset": ({"tags": TAGS, "request_id": "a", "return_state": True, "nan_policy": pb.NAN_POLICY_OMIT}, {}),
    "repeated": (
        {"tags": TAGS, "request_id": "a", "return_state": True, "nan_policy": pb.NAN_POLICY_OMIT},
        {"tags": TAGS, "request_id": "a", "return_state": True, "nan_policy": pb.NAN_POLICY_OMIT},
    ),
    "empty tags": ({"tags": TAGS}, {"tags": pb.Tags()}),
    "propagate after the default": ({}, {"nan_policy": pb.NAN_POLICY_PROPAGATE}),
    "return_state false after true": ({"return_state": True}, {"return_state": False}),
    "batch_id": ({}, {"batch_id": "b1"}),
}


@pytest.mark.parametrize(("first", "later"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_a_later_message_repeating_or_leaving_fields_unset_is_accepted(
    stub: pb_grpc.LossServiceStub, first: dict[str, Any], later: dict[str, Any]
) -> None:
    response = stub.EvaluateStream(iter([first_message(**first), message(1, **later)]), timeout=30)
    assert response.results[0].denominator == 2 * N
    assert response.request_id == first.get("request_id", "")
    assert response.results[0].HasField("state") == first.get("return_state", False)


def test_an_unknown_nan_policy_in_the_first_message_is_refused(stub: pb_grpc.LossServiceStub) -> None:
    exc = from_rpc_error(status_of(lambda: stub.EvaluateStream(iter([first_message(nan_policy=99)]), timeout=30)))
    assert isinstance(exc, InvalidArgumentError)
    (violation,) = exc.violations
    assert violation.field == "nan_policy" and violation.description.endswith("got 99"), violation


def test_the_client_stream_and_chunked_evaluate_still_work(server: ServerThread, client: Client) -> None:
    batches = [arrays(seed) for seed in range(3)]
    out = client.evaluate_stream(
        batches, ["cross_entropy"], tags={"model": "m", "step": "3"}, return_state=True, request_id="s-1", nan_policy="omit"
    )
    assert out.request_id == "s-1" and out.batches == 3 and out["cross_entropy"].state is not None
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    expected = client.evaluate(whole, "cross_entropy")["cross_entropy"].value
    assert_close(out["cross_entropy"].value, expected, rtol=1e-6, what="stream")
    with Client(server.address, timeout=30, chunk_bytes=256) as chunky:  # one batch sent in parts sharing a batch_id
        chunked = chunky.evaluate(whole, "cross_entropy", tags={"model": "m"}, request_id="c-1", nan_policy="raise")
    assert chunked.request_id == "c-1" and chunked.batches == 1
    assert_close(chunked["cross_entropy"].value, expected, rtol=1e-6, what="chunked")
