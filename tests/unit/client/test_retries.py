"""Which failed calls the client retries, and when: never one a server may have worked on (lossd.client.retries)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from lossd.client.errors import LossdError, UnavailableError, from_rpc_error
from lossd.client.retries import PUSHBACK_KEY, Attempts, ReplayableMessages, call_retrying, overload_delay, retry_delay
from lossd.v1 import lossd_pb2 as pb


class FailedCall(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    """What grpc raises for a failed call: code(), details(), trailing_metadata()."""

    def __init__(self, code: grpc.StatusCode, status: status_pb2.Status | None, pushback: str | None = None) -> None:
        self._code = code
        self._metadata: tuple[tuple[str, str | bytes], ...] = ()
        if status is not None:
            self._metadata += (("grpc-status-details-bin", status.SerializeToString()),)
        if pushback is not None:
            self._metadata += ((PUSHBACK_KEY, pushback),)
        self._details = status.message if status is not None else "Received message larger than max (9 vs. 1)"

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata


def status(*, retry_after: float | None, code: int = code_pb2.RESOURCE_EXHAUSTED) -> status_pb2.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="OVERLOADED", domain="lossd", metadata={"setting": "max_concurrent_requests"}))
    details = [info]
    if retry_after is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    return status_pb2.Status(code=code, message="server overloaded", details=details)


def error(call: FailedCall) -> LossdError:
    try:
        raise from_rpc_error(call) from call
    except LossdError as exc:
        return exc


def test_an_overloaded_answer_is_retried_after_its_hint_with_jitter() -> None:
    overloaded = error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=0.2), pushback="200"))
    delays = [overload_delay(overloaded) for _ in range(200)]
    assert all(d is not None and 0.2 <= d < 0.3 for d in delays), delays
    assert len(set(delays)) > 100  # jittered, not one value
    only_pushback = error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, None, pushback="400"))
    delay = overload_delay(only_pushback)
    assert delay is not None and 0.4 <= delay < 0.6


@pytest.mark.parametrize(
    "call",
    [
        FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=None), pushback="-1"),  # over a server budget
        FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=None)),  # a budget, from a server without pushback
        FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, None),  # gRPC's own message-size refusal
        FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=0.2), pushback="-1"),  # pushback says never
        FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, None, pushback="soon"),  # not an integer: gRPC reads "never"
        FailedCall(grpc.StatusCode.INVALID_ARGUMENT, status(retry_after=0.2, code=code_pb2.INVALID_ARGUMENT)),
    ],
    ids=["budget", "budget-no-pushback", "message-size", "pushback-never", "pushback-garbled", "invalid-argument"],
)
def test_nothing_else_is_retried(call: FailedCall) -> None:
    assert overload_delay(error(call)) is None


class Unavailable(FailedCall):
    """An UNAVAILABLE in gRPC's (or a server's) words."""

    def __init__(self, details: str, status: status_pb2.Status | None = None, pushback: str | None = None) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, status, pushback)
        self._details = details


NOT_CONNECTED = [
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
    "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
    "DNS resolution failed for lossd.invalid:50051: C-ares status is not ARES_SUCCESS",
    "empty address list: ",
]


@pytest.mark.parametrize("details", NOT_CONNECTED)
def test_a_call_that_could_not_connect_is_retried_with_a_growing_jittered_backoff(details: str) -> None:
    unreached = error(Unavailable(details))
    assert isinstance(unreached, UnavailableError) and unreached.unreached and "lost" not in str(unreached)
    for retry, low in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.6), (6, 2.0), (9, 2.0)]:
        delays = [retry_delay(unreached, retry) for _ in range(50)]
        assert all(d is not None and low <= d < low * 1.5 for d in delays), (retry, delays)


@pytest.mark.parametrize(
    "details",
    [
        "Stream removed (Socket closed)",  # the server died under the call (gRPC 1.85, sync and asyncio)
        "Socket closed",
        "Connection reset by peer",
        "Cancelling all calls",  # a server stopped while the call was in its handler
        "keepalive watchdog timeout",
        "no lossd replica answered this request",  # nginx, without a retry mark
        "draining",  # a handler's UNAVAILABLE without a retry mark
        "an UNAVAILABLE worded in a way never seen before",
    ],
)
def test_an_unavailable_that_may_have_reached_a_server_is_never_retried(details: str) -> None:
    lost = error(Unavailable(details))
    assert isinstance(lost, UnavailableError) and not lost.unreached and not lost.retry_marked
    assert retry_delay(lost) is None and Attempts(5, timeout=60).next_wait(lost) is None
    assert str(lost).startswith(f"UNAVAILABLE: {details}; the server was lost during the call or refused it")


def test_an_unavailable_the_server_marked_retryable_is_retried_after_its_hint() -> None:
    by_pushback = error(Unavailable("draining", pushback="300"))
    delay = retry_delay(by_pushback)
    assert isinstance(by_pushback, UnavailableError) and by_pushback.retry_marked
    assert delay is not None and 0.3 <= delay < 0.45 and str(by_pushback) == "UNAVAILABLE: draining"
    by_retry_info = error(Unavailable("server overloaded", status(retry_after=0.2, code=code_pb2.UNAVAILABLE)))
    delay = retry_delay(by_retry_info)
    assert delay is not None and 0.2 <= delay < 0.3
    never = error(Unavailable("draining", pushback="-1"))
    assert retry_delay(never) is None and "lost during the call" in str(never)


def test_call_retrying_retries_a_call_that_could_not_connect_but_not_one_lost_mid_call() -> None:
    for details, expected_attempts in [(NOT_CONNECTED[0], 3), ("Stream removed (Socket closed)", 1)]:
        calls: list[float] = []
        failure = Unavailable(details)

        def fails(left: float, calls: list[float] = calls, failure: Unavailable = failure) -> None:
            calls.append(left)
            raise failure

        with pytest.raises(UnavailableError) as info:
            call_retrying(fails, attempts=3, timeout=10)
        assert len(calls) == expected_attempts and info.value.__cause__ is failure


def test_retries_stop_at_the_attempts_and_never_wait_past_the_deadline() -> None:
    overloaded = error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=0.01)))
    attempts = Attempts(3, timeout=10)
    assert attempts.next_wait(overloaded) is not None and attempts.next_wait(overloaded) is not None
    assert attempts.next_wait(overloaded) is None  # the third attempt was the last
    slow = error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=5.0)))
    assert Attempts(5, timeout=1).next_wait(slow) is None  # the hint is past the deadline: fail now, not at the deadline


def test_call_retrying_gives_each_attempt_the_time_left_and_raises_the_last_error() -> None:
    seen: list[float] = []
    overloaded = FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, status(retry_after=0.05))

    def refused(left: float) -> None:
        seen.append(left)
        raise overloaded

    t0 = time.monotonic()
    with pytest.raises(LossdError) as info:
        call_retrying(refused, attempts=3, timeout=10)
    assert len(seen) == 3 and seen[0] > seen[1] > seen[2] and seen[0] <= 10
    assert time.monotonic() - t0 >= 0.1  # two waits of at least the 0.05 s hint
    assert info.value.__cause__ is overloaded
    budget_refusal = FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    calls: list[float] = []

    def too_big(left: float) -> None:
        calls.append(left)
        raise budget_refusal

    with pytest.raises(LossdError):
        call_retrying(too_big, attempts=5, timeout=10)
    assert len(calls) == 1


def messages(n: int) -> list[bytes]:
    return [pb.EvaluateRequest(request_id=f"r{i}", batch_id=str(i)).SerializeToString() for i in range(n)]


def test_a_replay_sends_the_kept_messages_then_reads_on() -> None:
    sent = messages(4)
    source = iter(sent)
    replayable = ReplayableMessages(source, limit=1 << 20)
    first = replayable.attempt()
    assert [next(first), next(first)] == sent[:2]
    second = replayable.attempt()
    assert list(first) == []  # the old attempt stops reading: the new one owns the source
    assert list(second) == sent
    assert replayable.replayable


def test_a_stream_over_the_buffer_is_not_replayable() -> None:
    sent = messages(50)
    replayable = ReplayableMessages(iter(sent), limit=sum(len(m) for m in sent[:10]))
    assert list(replayable.attempt()) == sent
    assert not replayable.replayable


def test_a_new_attempt_waits_for_the_old_reader_to_let_go() -> None:
    release = threading.Event()

    def slow_source() -> object:
        yield pb.EvaluateRequest(batch_id="0").SerializeToString()
        release.wait(5)
        yield pb.EvaluateRequest(batch_id="1").SerializeToString()

    replayable = ReplayableMessages(slow_source(), limit=1 << 20)  # type: ignore[arg-type]
    first = replayable.attempt()
    next(first)
    reader = threading.Thread(target=lambda: next(first, None))  # blocked inside the source
    reader.start()
    time.sleep(0.05)
    threading.Timer(0.1, release.set).start()
    second = replayable.attempt()  # waits for the reader above, which keeps the message it read
    reader.join(5)
    assert [pb.EvaluateRequest.FromString(m).batch_id for m in second] == ["0", "1"]
