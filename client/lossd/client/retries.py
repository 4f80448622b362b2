"""Which failed calls the clients try again: only those that no server's handler has worked on.

A request that crashed one server (a query of death) must never be
replayed onto the next, so nothing that may have reached a handler is
retried by itself. The rule, for every call (unary and streams):

* **UNAVAILABLE because gRPC could not connect** ("failed to connect to
  all addresses", a failed name resolution: no server is up yet, or it is
  restarting): the call never left this client. Retried after a backoff of
  0.1 s doubling to 2 s, times a random factor in [1, 1.5).
* **A refusal the server marked retryable**: an overloaded replica's
  RESOURCE_EXHAUSTED, or an UNAVAILABLE (a server or proxy that did not
  start the work), with a ``google.rpc.RetryInfo`` delay or a
  ``grpc-retry-pushback-ms`` >= 0. Retried after that hint times a random
  factor in [1, 1.5) (jitter: refused clients do not come back in one
  burst; never sooner than asked).
* **Everything else is raised**: an UNAVAILABLE after the request was sent
  (the server died under it: "Socket closed"; or it was stopped mid-call)
  says so in its message; a budget or message-size refusal (pushback -1,
  or no hint) would fail the same way again.

gRPC's own configurable retry policy is off (the channel has none: it
would replay every UNAVAILABLE, a crash mid-call included). Its
*transparent* retries stay on (``grpc.enable_retries``): gRPC itself
resends, at once, an attempt that never went out on the wire (its
connection closed before it was written) or that the server refused
unprocessed (a stream above a draining server's GOAWAY, REFUSED_STREAM),
and never one a server may have processed.

Every retry happens within the call's deadline, which covers every
attempt, and at most ``attempts`` tries in all. The request of every
attempt is the same (the same bytes, the same request id).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from google.rpc import error_details_pb2

from lossd.client.core import lossd_errors
from lossd.client.errors import PUSHBACK_KEY, LossdError, ResourceExhaustedError, UnavailableError, retry_pushback_ms

__all__ = [
    "PUSHBACK_KEY",
    "RETRIED",
    "overload_delay",
    "retry_delay",
    "Attempts",
    "call_retrying",
    "call_retrying_async",
    "ReplayableMessages",
]

T = TypeVar("T")

JITTER = (1.0, 1.5)  # the hint times a factor in this range: never sooner than the server asked
# Not connected: gRPC's own defaults for its retry policy (0.1 s, doubling, at most 2 s).
CONNECT_BACKOFF, CONNECT_BACKOFF_MULTIPLIER, CONNECT_BACKOFF_MAX = 0.1, 2.0, 2.0
# The errors that may be retried (:func:`retry_delay` says which of them, and when).
RETRIED = (ResourceExhaustedError, UnavailableError)


def _hinted_delay(error: LossdError) -> float | None:
    """The server's retry hint (RetryInfo, else the pushback), jittered; None when it gave none or said never."""
    pushback = retry_pushback_ms(error.__cause__)
    if pushback is not None and pushback < 0:
        return None
    hints = error.details(error_details_pb2.RetryInfo)
    if hints:
        hint = hints[0].retry_delay.ToTimedelta().total_seconds()
    elif pushback is not None:
        hint = pushback / 1000
    else:
        return None
    return float(max(hint, 0.0) * random.uniform(*JITTER))


def overload_delay(error: LossdError) -> float | None:
    """Seconds to wait before retrying an overloaded answer (jittered), or None: ``error`` is not one."""
    if not isinstance(error, ResourceExhaustedError):
        return None
    return _hinted_delay(error)  # None for a budget or message-size refusal: the same request fails the same way again


def retry_delay(error: LossdError, retry: int = 1) -> float | None:
    """Seconds to wait before the ``retry``-th retry after ``error`` (jittered), or None: it must not be retried."""
    if isinstance(error, UnavailableError):
        if error.unreached:  # the call never reached a server
            backoff = min(CONNECT_BACKOFF * CONNECT_BACKOFF_MULTIPLIER ** (retry - 1), CONNECT_BACKOFF_MAX)
            return backoff * random.uniform(*JITTER)
        return _hinted_delay(error) if error.retry_marked else None  # else it may have reached a handler
    return overload_delay(error)


class Attempts:
    """The attempts of one call: at most ``attempts``, all within ``timeout`` seconds from now."""

    def __init__(self, attempts: int, timeout: float) -> None:
        self.left = attempts
        self.retries = 0
        self.end = time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left for the next attempt (a small positive floor: gRPC refuses a zero deadline)."""
        return max(self.end - time.monotonic(), 1e-3)

    def next_wait(self, error: LossdError) -> float | None:
        """How long to wait before the next attempt after ``error``; None when there is none (raise it)."""
        self.left -= 1
        self.retries += 1
        delay = retry_delay(error, self.retries)
        if delay is None or self.left <= 0 or time.monotonic() + delay >= self.end:
            return None
        return delay


def call_retrying(call: Callable[[float], T], attempts: int, timeout: float) -> T:
    """``call(seconds left)``, its gRPC error raised as a LossdError, retried as the module's rule says."""
    budget = Attempts(attempts, timeout)
    while True:
        try:
            with lossd_errors():
                return call(budget.remaining())
        except RETRIED as error:
            wait = budget.next_wait(error)
            if wait is None:
                raise
        time.sleep(wait)


async def call_retrying_async(call: Callable[[float], Awaitable[T]], attempts: int, timeout: float) -> T:
    """The asyncio twin of :func:`call_retrying`."""
    budget = Attempts(attempts, timeout)
    while True:
        try:
            with lossd_errors():
                return await call(budget.remaining())
        except RETRIED as error:
            wait = budget.next_wait(error)
            if wait is None:
                raise
        await asyncio.sleep(wait)


class ReplayableMessages:
    """A stream's serialized messages, kept while they total at most ``limit`` bytes, so that a refused attempt can be replayed.

    The batches are read once, as the first attempt sends them; a later
    attempt sends the kept messages again, then reads on. As with gRPC's
    own retry buffer, a stream larger than ``limit`` cannot be replayed.
    """

    def __init__(self, source: Iterator[bytes], limit: int) -> None:
        self._source = source
        self._limit = limit
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self.replayable = True
        self._lock = threading.Lock()  # held while the source is read: one reader at a time
        self._attempt = 0

    def attempt(self) -> Iterator[bytes]:
        """The messages of a new attempt; the previous attempt's reader stops reading (waits for it to let go first)."""
        with self._lock:
            self._attempt += 1
            return self._messages(self._attempt, list(self._kept))

    def _messages(self, attempt: int, kept: list[bytes]) -> Iterator[bytes]:
        yield from kept
        while True:
            with self._lock:
                if attempt != self._attempt:
                    return  # a newer attempt reads on from here
                message = next(self._source, None)
                if message is None:
                    return
                self._keep(message)
            yield message

    def _keep(self, message: bytes) -> None:
        if not self.replayable:
            return
        self._kept_bytes += len(message)  # serialized already: its length, not a re-encoding (ByteSize) of the message
        if self._kept_bytes > self._limit:
            self.replayable = False
            self._kept.clear()
        else:
            self._kept.append(message)
