"""EvaluateStream on a blocking channel: the request iterator gRPC reads on its own thread, and the wait for the answer.

Both clients stream this way (the asyncio one from a worker thread; see
:meth:`lossd.client.AsyncClient.evaluate_stream` for why). A failure that
:mod:`lossd.client.retries` allows to retry (no connection could be made,
or an overloaded answer) is retried, the messages sent so far replayed,
while they fit the retry buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from lossd.client.channel import RETRY_BUFFER_BYTES
from lossd.client.core import lossd_errors
from lossd.client.evaluation import EvaluationResult
from lossd.client.retries import RETRIED, Attempts, ReplayableMessages

__all__ = ["GuardedRequests", "start_stream", "stream_result", "RetryingStream"]


class GuardedRequests:
    """A request iterator that, when the caller's iterable raises, cancels the call and keeps the error.

    gRPC would otherwise log the exception and end the call with UNKNOWN; a
    cancelled call never lets the server finalize a partial stream.
    """

    def __init__(self, messages: Iterator[bytes]) -> None:
        self.messages = messages
        self.error: BaseException | None = None
        self._call: grpc.Future | None = None
        self._attached = threading.Event()

    def attach(self, call: grpc.Future) -> None:
        """The call reading these requests (cancelled if the caller's iterable raises)."""
        self._call = call
        self._attached.set()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.messages
        except Exception as exc:
            self.error = exc
            self._attached.wait()
            assert self._call is not None
            self._call.cancel()


def start_stream(method: Any, messages: Iterator[bytes], deadline: float) -> tuple[grpc.Future, GuardedRequests]:
    """Start ``method`` (EvaluateStream taking serialized messages) on ``messages``; gRPC reads them on its own thread."""
    guard = GuardedRequests(messages)
    call: grpc.Future = method.future(iter(guard), timeout=deadline)
    guard.attach(call)
    return call, guard


def stream_result(call: grpc.Future, guard: GuardedRequests) -> EvaluationResult:
    """Wait for a stream's response; the caller's own error first, if its batches raised one."""
    try:
        with lossd_errors():
            response = call.result()
    except grpc.FutureCancelledError:
        if guard.error is not None:
            raise guard.error from None
        raise
    except Exception:
        if guard.error is not None:
            raise guard.error from None
        raise
    return EvaluationResult(response)


class RetryingStream:
    """One EvaluateStream call, attempted again (messages replayed) as :mod:`lossd.client.retries` allows.

    ``method`` is EvaluateStream on serialized messages (a channel's ``stream_unary`` without a request
    serializer); ``timeout`` covers every attempt.
    :meth:`result` blocks (the asyncio client runs it in a worker thread);
    :meth:`cancel` may come from any thread.
    """

    def __init__(self, method: Any, messages: Iterator[bytes], *, attempts: int, timeout: float) -> None:
        self._method = method
        self._messages = ReplayableMessages(messages, RETRY_BUFFER_BYTES)
        self._attempts = Attempts(attempts, timeout)
        self._cancelled = threading.Event()
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()

    def _start(self) -> tuple[grpc.Future, GuardedRequests]:
        with self._lock:
            call, guard = start_stream(self._method, self._messages.attempt(), self._attempts.remaining())
            self._call = call
            if self._cancelled.is_set():
                call.cancel()
            return call, guard

    def result(self) -> EvaluationResult:
        """The stream's response; a retryable failure (never one a server may have worked on) is retried while the messages can be replayed."""
        wait: Callable[[float], bool] = self._cancelled.wait
        while True:
            call, guard = self._start()
            try:
                return stream_result(call, guard)
            except RETRIED as error:
                delay = self._attempts.next_wait(error)
                if delay is None or not self._messages.replayable or wait(delay):
                    raise

    def cancel(self) -> None:
        """Cancel the attempt in flight and any later one (the server never finalizes a partial stream)."""
        self._cancelled.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
