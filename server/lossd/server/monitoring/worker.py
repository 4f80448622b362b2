"""A bounded FIFO of monitoring work, drained by one background thread, off the response path.

The servicer's subscribers run on the event loop right after a response is
produced; they only :meth:`Worker.submit` the event here, so that no response
waits for monitoring. One thread keeps the events in order (a stream's messages
before its result). When several are queued it takes them together, up to
``max_batch``, and hands them, in order, to ``handle_batch`` (when set; else
to ``handle`` one at a time): under load the per-batch work (metric updates,
history writes) is paid once for all of them. Memory is bounded: past
``max_events`` queued events or ``max_bytes`` of tensors they hold, new events
are dropped and counted, never queued (one event is always admitted into an
empty queue, and small control events, which hold no tensors, get four times
the event bound before they are dropped too). An event counts against the bounds
until the batch it was taken in is handled. :meth:`Worker.flush` waits until
everything submitted before it is done (tests, and a scrape that must see the
responses sent before it).

Under load the thread does not wake per event: after each batch it lets the
next gather for up to ``gather_seconds`` (or until ``max_batch`` are queued),
and events queued meanwhile wake nobody, so that one wake, and one round of
contention for the GIL with the event loop, serves many responses. A flush or a
close cuts the gathering short; an event that finds the thread idle (nothing
handled within the last ``gather_seconds``) wakes it at once, and so does an
event holding ``urgent_bytes`` of tensors or more: a gather saves little next
to its own work, and the memory it holds (a client's shared-memory segment,
under the lock that keeps the client from reusing it) is let go sooner.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["Worker"]

T = TypeVar("T")

log = logging.getLogger("lossd.monitoring")

# Events handed to ``handle_batch`` at most at once: a flush never waits for more than this many behind it.
MAX_BATCH = 64
# How long the worker lets events gather after a batch before taking the next. Each wake costs a
# thread switch and a round of GIL contention with the event loop that serves the responses. At a few
# hundred small requests a second on two loaded cores, 2 ms gathered 1.4 events per wake and cost more
# throughput than it saved; 10 ms gathers 5-6 (tens at thousands a second), while an event still
# reaches /metrics within 10 ms (at once when the worker is idle, or for a flush).
GATHER_SECONDS = 0.01
# Events holding this many bytes of tensors are taken without waiting out a gather. Under a steady
# loop of 16 MB shared-memory calls the gather kept 8-9 of the client's segments locked at a time.
URGENT_BYTES = 1 << 20


def _check_limits(max_events: int, max_bytes: int, max_batch: int, gather_seconds: float) -> None:
    if max_events < 1 or max_bytes < 1 or max_batch < 1:
        raise ValueError(f"max_events, max_bytes and max_batch: expected >= 1, got {max_events}, {max_bytes} and {max_batch}")
    if not 0 <= gather_seconds <= 1:
        raise ValueError(f"gather_seconds: expected a number of seconds in [0, 1], got {gather_seconds}")


def _handle_all(items: list[T], handle: Callable[[T], None], handle_batch: Callable[[Sequence[T]], None] | None, name: str) -> None:
    """``handle_batch(items)``, or ``handle`` on each; never raises (handlers count their own failures)."""
    try:
        if handle_batch is not None:
            handle_batch(items)
        else:
            for item in items:
                handle(item)
    except Exception:  # the worker thread must outlive any handler
        log.exception("%s: a handler raised", name)


class Worker(Generic[T]):
    """Runs ``handle(item)`` (or ``handle_batch(items)``, see :meth:`handle_batches`) for each submitted item, in order, on one daemon thread."""

    def __init__(
        self,
        handle: Callable[[T], None],
        *,
        max_events: int,
        max_bytes: int,
        on_drop: Callable[[T], None],
        name: str = "lossd-monitoring",
        max_batch: int = MAX_BATCH,
        gather_seconds: float = GATHER_SECONDS,
        urgent_bytes: int = URGENT_BYTES,
    ) -> None:
        _check_limits(max_events, max_bytes, max_batch, gather_seconds)
        self._handle, self._on_drop = handle, on_drop
        self._handle_batch: Callable[[Sequence[T]], None] | None = None
        self._initializer: Callable[[], None] | None = None
        self.max_events, self.max_bytes, self.max_batch = max_events, max_bytes, max_batch
        self.gather_seconds, self.urgent_bytes, self.name = gather_seconds, urgent_bytes, name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[tuple[T, int]] = deque()
        self._events = self._bytes = 0  # queued or being handled
        self._submitted = self._done = 0  # items accepted so far, items handled so far
        self._waiters: deque[tuple[int, Future[None]]] = deque()  # (items that must be done, future), ascending
        self._thread: threading.Thread | None = None
        self._sleeping = self._closed = False
        self._gathering = False  # letting a batch gather: only a full batch, an urgent event, a flush or a close wakes the thread
        self._urgent = False  # an event of urgent_bytes or more is queued
        self._handled_one = False  # a batch was taken: gather the next before taking it

    def handle_batches(self, handle_batch: Callable[[Sequence[T]], None], *, initializer: Callable[[], None] | None = None) -> None:
        """Hand queued items to ``handle_batch`` together (in order) instead of to ``handle`` one at a time; call before submitting.

        ``initializer`` runs first on the worker thread (per-thread library state)."""
        self._handle_batch, self._initializer = handle_batch, initializer

    @property
    def pending(self) -> tuple[int, int]:
        """(events, bytes) queued or being handled now."""
        with self._lock:
            return self._events, self._bytes

    def submit(self, item: T, nbytes: int, *, control: bool = False) -> bool:
        """Queue ``item`` (holding ``nbytes`` of tensors); False (and ``on_drop``) when the queue is full."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot queue work after close()")
            limit = self.max_events * (4 if control else 1)
            full = self._events + 1 > limit or (self._events > 0 and self._bytes + nbytes > self.max_bytes)
            if not full:
                self._events += 1
                self._bytes += nbytes
                self._submitted += 1
                self._queue.append((item, nbytes))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                    self._thread.start()
                self._urgent = self._urgent or nbytes >= self.urgent_bytes
                if self._sleeping or (self._gathering and (self._urgent or len(self._queue) >= self.max_batch)):
                    self._wake.notify()
        if full:
            self._on_drop(item)
        return not full

    def _take(self) -> list[tuple[T, int]] | None:
        """The next batch, waiting for one; None once closed and drained."""
        with self._lock:
            if self._handled_one:  # the thread just handled a batch: let the next gather, unwoken
                self._gathering = True
                self._wake.wait_for(
                    lambda: self._urgent or len(self._queue) >= self.max_batch or self._closed or bool(self._waiters), self.gather_seconds
                )
                self._gathering = False
            while not self._queue:
                if self._closed:
                    return None
                self._sleeping = True
                self._wake.wait()
                self._sleeping = False
            self._handled_one, self._urgent = True, False
            return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]

    def _loop(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception:
                log.exception("%s: the thread's initializer raised", self.name)
        while (batch := self._take()) is not None:
            _handle_all([item for item, _ in batch], self._handle, self._handle_batch, self.name)
            self._finished(batch)
            # The events hold their requests' tensors (a 16 MB batch, a client's shared-memory segment under
            # its lock): nothing of them may stay referenced while the thread waits for the next batch.
            del batch

    def _finished(self, batch: list[tuple[T, int]]) -> None:
        with self._lock:
            self._events -= len(batch)
            self._bytes -= sum(nbytes for _, nbytes in batch)
            self._done += len(batch)
            ready = []
            while self._waiters and self._waiters[0][0] <= self._done:
                ready.append(self._waiters.popleft()[1])
        for future in ready:
            future.set_result(None)

    def _done_future(self) -> Future[None] | None:
        """A future done once every item submitted so far is handled; None when they already are."""
        with self._lock:
            target = self._submitted
            if self._done >= target:
                return None
            if self._waiters and self._waiters[-1][0] == target:
                return self._waiters[-1][1]  # a flush already waits for the same items
            future: Future[None] = Future()
            self._waiters.append((target, future))
            self._wake.notify()  # a flush waits: a gathering batch is taken now (a sleeping thread sleeps on)
            return future

    def flush_sync(self, timeout: float | None = None) -> bool:
        """Block until every item submitted so far is handled; False on timeout."""
        future = self._done_future()
        if future is None:
            return True
        try:
            future.result(timeout)
        except TimeoutError:
            return False
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        """:meth:`flush_sync` without blocking the event loop."""
        future = self._done_future()
        if future is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop taking work; what is queued still runs."""
        with self._lock:
            self._closed = True
            self._wake.notify()
