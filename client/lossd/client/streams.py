"""EvaluateStream on a blocking channel: the request iterator gRPC reads on its own thread, and the wait for the answer.

Both clients stream this way (the asyncio one from a worker thread; see
:meth:`lossd.client.AsyncClient.evaluate_stream` for why).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from lossd.client.core import lossd_errors
from lossd.client.evaluation import EvaluationResult
from lossd.v1 import lossd_pb2 as pb

__all__ = ["GuardedRequests", "start_stream", "stream_result"]


class GuardedRequests:
    """A request iterator that, when the caller's iterable raises, cancels the call and keeps the error.

    gRPC would otherwise log the exception and end the call with UNKNOWN; a
    cancelled call never lets the server finalize a partial stream.
    """

    def __init__(self, messages: Iterator[pb.EvaluateRequest]) -> None:
        self.messages = messages
        self.error: BaseException | None = None
        self._call: grpc.Future | None = None
        self._attached = threading.Event()

    def attach(self, call: grpc.Future) -> None:
        """The call reading these requests (cancelled if the caller's iterable raises)."""
        self._call = call
        self._attached.set()

    def __iter__(self) -> Iterator[pb.EvaluateRequest]:
        try:
            yield from self.messages
        except Exception as exc:
            self.error = exc
            self._attached.wait()
            assert self._call is not None
            self._call.cancel()


def start_stream(method: Any, messages: Iterator[pb.EvaluateRequest], deadline: float) -> tuple[grpc.Future, GuardedRequests]:
    """Start ``method`` (a stub's EvaluateStream) on ``messages``; gRPC reads them on its own thread."""
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
