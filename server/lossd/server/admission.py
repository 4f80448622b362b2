"""Admission control: how much work the server accepts, and which compute lane runs it.

Two bounds keep an overloaded replica answering instead of drowning:

- *concurrent requests*: RPCs in progress at once (a stream counts once, for
  its whole life), ``max_concurrent_requests``;
- *queued work*: units of work (an Evaluate, a Finalize, one stream message,
  a stream's finalize) waiting for a compute thread, counted and summed in
  request bytes per lane, ``max_queued_requests`` and ``max_queued_bytes``.

Past a bound the call is refused at once with :class:`Overloaded`
(``RESOURCE_EXHAUSTED`` with a retry-after hint naming the setting); nothing
is decoded or allocated for it. Requests of ``large_request_bytes`` or more
run on their own threads, so a small request never waits behind 16 MB ones.

A third bound holds over the work running at once: the *estimated memory* of
every unit of work on the compute threads (and inline), summed, stays within
``max_concurrent_memory_bytes`` (:class:`MemoryLedger`). Each request is
within ``max_request_memory_bytes`` on its own; without the sum, a few small
requests asking for large states (thousands of classes × 1000 bins) would
together exhaust the host. Work that would pass it is refused with
:class:`Overloaded`, unless nothing else is running (one request alone is
bounded by its own budget).

Each unit of work runs with a :class:`lossd.kernels.cancellation.CancelToken`:
a call cancelled by its client, or past its deadline, stops computing at the
kernels' next chunk.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TypeVar

from lossd.kernels.cancellation import CancelToken, cancellable
from lossd.kernels.errors import StateLimitExceeded
from lossd.server.allocator import IdleTrim, init_compute_thread

__all__ = ["Admission", "AdmissionLimits", "Lane", "Overloaded"]

T = TypeVar("T")


class Overloaded(StateLimitExceeded):
    """The server is at one of its admission bounds; the client may retry after ``retry_after`` seconds."""

    reason = "OVERLOADED"

    def __init__(self, message: str, setting: str, retry_after: float) -> None:
        super().__init__(message, setting)
        self.retry_after = retry_after


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds of :class:`Admission` (from Settings)."""

    max_concurrent_requests: int = 64
    max_queued_requests: int = 32
    max_queued_bytes: int = 1 << 30
    large_request_bytes: int = 1 << 20
    compute_threads: int = 2
    retry_after_seconds: float = 1.0
    inline_request_bytes: int = 64 << 10  # work this small (with inline=True) runs on the event loop; 0: never
    max_concurrent_memory_bytes: int | None = None  # estimated memory of the work running at once; None: no bound

    @property
    def inline_memory_bytes(self) -> int:
        """Inline work must also have a memory estimate at most this (the servicer checks): 64 times its byte bound."""
        return 64 * self.inline_request_bytes


class MemoryLedger:
    """The estimated memory of the units of work running now; each reserves on its thread and frees when it ends.

    ``reserve`` is the server's ``Budget.reserve``: the kernels call it once a
    unit of work's estimates pass the per-request budget, before they allocate
    (a stream reserves per message). :meth:`Admission.run` frees what the
    unit reserved on its thread when it returns or fails."""

    def __init__(self, max_bytes: int | None, refuse: Callable[[str, str], Overloaded]) -> None:
        self.max_bytes = max_bytes
        self._refuse = refuse
        self._lock = threading.Lock()
        self.reserved = 0
        self._held = threading.local()  # what the unit of work on this thread reserved

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` for the unit of work on this thread, or raise Overloaded when the sum would pass the bound."""
        with self._lock:
            if self.max_bytes is not None and self.reserved and self.reserved + nbytes > self.max_bytes:
                raise self._refuse(
                    f"{self.reserved / (1 << 20):,.1f} MiB of estimated memory in use by running requests, this one needs "
                    f"{nbytes / (1 << 20):,.1f} MiB more, over {self.max_bytes / (1 << 20):,.1f} MiB",
                    "max_concurrent_memory_bytes",
                )
            self.reserved += nbytes
        self._held.bytes = getattr(self._held, "bytes", 0) + nbytes

    def release_held(self) -> None:
        """Free what the unit of work on this thread reserved (it has ended)."""
        held = getattr(self._held, "bytes", 0)
        if held:
            self._held.bytes = 0
            with self._lock:
                self.reserved -= held


class Lane:
    """One compute pool and its queue: work submitted and not yet started is *queued*."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        # Daemon-like: shutdown(wait=False) never joins a stuck thread (the process exits after the grace).
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"lossd-{name}", initializer=init_compute_thread)
        self._lock = threading.Lock()
        self.queued = 0
        self.queued_bytes = 0
        self.running = 0

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            self.queued += 1
            self.queued_bytes += nbytes

    def start(self, nbytes: int) -> None:
        with self._lock:
            self.queued -= 1
            self.queued_bytes -= nbytes
            self.running += 1

    def finish(self) -> None:
        with self._lock:
            self.running -= 1

    def release(self, nbytes: int) -> None:
        """Give back a reservation whose work never started (cancelled while queued)."""
        with self._lock:
            self.queued -= 1
            self.queued_bytes -= nbytes


class Admission:
    """Bounds on concurrent and queued work, two compute lanes by request size."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.small = Lane("compute", limits.compute_threads)
        self.large = Lane("compute-large", limits.compute_threads)
        self.active = 0  # touched on the event loop only
        self.memory = MemoryLedger(limits.max_concurrent_memory_bytes, self._refuse)
        self.on_idle: IdleTrim | None = None  # called on the loop when the last call in progress ends

    def _refuse(self, what: str, setting: str) -> Overloaded:
        # Jitter spreads the retries of many refused clients over time instead of one burst.
        delay = self.limits.retry_after_seconds * random.uniform(0.5, 1.5)
        return Overloaded(
            f"server overloaded: {what} (setting {setting}, LOSSD_{setting.upper()}); retry after {delay:.2f}s", setting, delay
        )

    def call(self) -> AbstractAsyncContextManager[None]:
        """Hold one of ``max_concurrent_requests`` slots for the ``async with`` block (an RPC's life), or raise Overloaded."""
        return _Slot(self)

    def lane_for(self, nbytes: int) -> Lane:
        """The lane a unit of work of ``nbytes`` request bytes runs on."""
        return self.large if nbytes >= self.limits.large_request_bytes else self.small

    async def run(self, fn: Callable[[], T], *, nbytes: int, deadline: float | None = None, inline: bool = False) -> T:
        """Run ``fn`` on its lane's threads, or raise Overloaded when the lane's queue is full.

        ``deadline`` (time.monotonic()) and the awaiting task's cancellation
        reach the kernels through a CancelToken: queued work that is cancelled
        never starts, running work stops at its next chunk. With ``inline``,
        work under ``inline_request_bytes`` runs here, on the event loop: for a
        [64, 10] request the hop to a thread and back costs more than the work."""
        if inline and nbytes < self.limits.inline_request_bytes:
            token = CancelToken(deadline)
            token.check()
            try:
                with cancellable(token):
                    return fn()
            finally:
                self.memory.release_held()
        lane = self.lane_for(nbytes)
        if lane.running + lane.queued >= lane.threads:  # it would wait for a thread: the queue's bounds apply
            if lane.queued >= self.limits.max_queued_requests:
                raise self._refuse(f"{lane.queued} requests queued for the {lane.name} threads", "max_queued_requests")
            if lane.queued and lane.queued_bytes + nbytes > self.limits.max_queued_bytes:
                raise self._refuse(f"{lane.queued_bytes + nbytes} request bytes queued", "max_queued_bytes")
        token = CancelToken(deadline)
        lane.reserve(nbytes)

        def work() -> T:
            lane.start(nbytes)
            try:
                token.check()  # the deadline may have passed while it waited
                with cancellable(token):
                    return fn()
            finally:
                self.memory.release_held()
                lane.finish()

        future = lane.pool.submit(contextvars.copy_context().run, work)  # the call's trace span and caller, in the thread
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            token.cancel()  # running work stops at its next chunk
            if future.cancel():  # it had not started: it never will
                lane.release(nbytes)
            raise

    def running(self) -> int:
        """Units of work on a compute thread now, over both lanes."""
        return self.small.running + self.large.running

    def idle(self) -> bool:
        """No call in progress and nothing on a compute thread."""
        return self.active == 0 and self.running() == 0

    def close(self) -> None:
        """Stop taking work; queued work is dropped, running threads are not waited for."""
        if self.on_idle is not None:
            self.on_idle.cancel()
            self.on_idle = None
        for lane in (self.small, self.large):
            lane.pool.shutdown(wait=False, cancel_futures=True)


class _Slot:
    """One concurrent-request slot of an Admission, held for a block (a class: no generator per RPC)."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def __aenter__(self) -> None:
        admission = self._admission
        if admission.active >= admission.limits.max_concurrent_requests:
            raise admission._refuse(f"{admission.active} requests in progress", "max_concurrent_requests")
        admission.active += 1

    async def __aexit__(self, *exc: object) -> None:
        admission = self._admission
        admission.active -= 1
        if admission.active == 0 and admission.on_idle is not None:
            admission.on_idle()


def deadline_of(time_remaining: float | None) -> float | None:
    """A call's deadline on the time.monotonic() clock, from grpc's ``context.time_remaining()``."""
    return None if time_remaining is None else time.monotonic() + time_remaining
