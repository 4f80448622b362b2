"""A bounded FIFO of monitoring work, drained by one background thread, off the response path.

The servicer's subscribers run on the event loop right after a response is
produced; they only :meth:`Worker.submit` the event here, so that no response
waits for monitoring. One thread keeps the events in order (a stream's messages
before its result). Memory is bounded: past ``max_events`` queued events or
``max_bytes`` of tensors they hold, new events are dropped and counted, never
queued (one event is always admitted into an empty queue, and small control
events, which hold no tensors, get four times the event bound before they are
dropped too). :meth:`Worker.flush` waits until everything submitted before it is
done (tests, and a scrape that must see the responses sent before it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["Worker"]

T = TypeVar("T")


class Worker(Generic[T]):
    """Runs ``handle(item)`` for each submitted item, in order, on one daemon-like worker thread."""

    def __init__(
        self, handle: Callable[[T], None], *, max_events: int, max_bytes: int, on_drop: Callable[[T], None], name: str = "lossd-monitoring"
    ) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError(f"max_events and max_bytes: expected >= 1, got {max_events} and {max_bytes}")
        self._handle = handle
        self._on_drop = on_drop
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._events = 0
        self._bytes = 0
        self._last: Future[None] | None = None

    @property
    def pending(self) -> tuple[int, int]:
        """(events, bytes) queued or being handled now."""
        with self._lock:
            return self._events, self._bytes

    def submit(self, item: T, nbytes: int, *, control: bool = False) -> bool:
        """Queue ``item`` (holding ``nbytes`` of tensors); False (and ``on_drop``) when the queue is full."""
        with self._lock:
            limit = self.max_events * (4 if control else 1)
            full = self._events + 1 > limit or (self._events > 0 and self._bytes + nbytes > self.max_bytes)
            if not full:
                self._events += 1
                self._bytes += nbytes
                self._last = self._pool.submit(self._run, item, nbytes)
        if full:
            self._on_drop(item)
        return not full

    def _run(self, item: T, nbytes: int) -> None:
        try:
            self._handle(item)
        finally:
            with self._lock:
                self._events -= 1
                self._bytes -= nbytes

    def flush_sync(self, timeout: float | None = None) -> bool:
        """Block until every item submitted so far is handled; False on timeout."""
        with self._lock:
            last = self._last
        if last is None:
            return True
        try:
            last.result(timeout)
        except TimeoutError:
            return False
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        """:meth:`flush_sync` without blocking the event loop."""
        with self._lock:
            last = self._last
        if last is None or last.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(last)), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop taking work; what is queued still runs."""
        self._pool.shutdown(wait=False)
