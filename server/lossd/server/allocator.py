"""Process-wide tuning of ``lossd serve``: large freed buffers kept (glibc), torch's thread count.

Buffers: keep large freed buffers in the process instead of returning them to the OS (glibc only).

Every request's tensors arrive as fresh Python ``bytes`` objects of the
message's size. glibc serves allocations above 128 KiB with a new ``mmap``
and unmaps them on free, so each 16 MB message paid ~4,000 page faults
(measured here: parsing plus decoding a 16 MB request took 29 ms, 8 ms with
reuse). Raising the mmap and trim thresholds makes those buffers come from
the heap and stay there for the next request. The cost is that resident
memory stays at its high-water mark, bounded by the largest messages
accepted; ``LOSSD_REUSE_LARGE_BUFFERS=false`` turns it off.

Idle: the buffers are kept while requests keep coming, not forever.
:class:`IdleTrim` gives every arena's free pages back to the OS
(``malloc_trim(0)``) once the server has had no request in progress for two
seconds, so that RSS after a burst returns to what live objects hold (it is
also what a soak measures: growth that survives a trim is a leak, not a cache).
It first waits for the monitoring work queued behind the burst, which holds
the requests' tensors, and runs the cyclic garbage collector: after eight
[512, 128256] requests, two of four runs of a server that did neither (and
two of three that only waited) sat idle at 1.2-1.5 GB, against 0.33-0.36 GB
in all five runs with both.

Arenas: glibc gives each thread that allocates its own arena, up to 8 per
core, and each arena keeps its own scattered pages: a trim can only give back
pages with nothing live on them. With the default, the soak's server sat idle
(after the trim) at 540-606 MiB and wandered by ±10% from one quiet point to the
next, its compute, gRPC and monitoring threads each holding a 64-128 MiB arena
heap with 16-100 MiB resident; with two arenas, 331-333 MiB, steady, for the same
load and throughput. Small allocations still come from each thread's cache
(tcache) without the arena lock. ``lossd serve`` bounds the arenas to
``LOSSD_MALLOC_ARENAS`` (default 2) unless ``MALLOC_ARENA_MAX`` is set, which
glibc applies itself.

Threads: each compute thread runs torch ops that torch itself spreads over
its intra-op threads. Two compute threads with two torch threads each on two
cores oversubscribe them (the four-function 16 MB case took 94-556 ms against
42-45 ms with one torch thread per compute thread), so ``lossd serve`` sets
torch's threads to the cores it may use divided by the compute threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
from collections.abc import Callable

from lossd.client import buffers
from lossd.server import affinity

__all__ = [
    "reuse_large_buffers",
    "limit_malloc_arenas",
    "release_free_memory",
    "IdleTrim",
    "available_cores",
    "torch_threads_for",
    "set_torch_threads",
    "match_torch_threads",
    "init_compute_thread",
]

log = logging.getLogger("lossd.server")

_M_ARENA_MAX = -8


def reuse_large_buffers(max_message_bytes: int) -> bool:
    """Tune glibc malloc for messages up to ``max_message_bytes`` (:mod:`lossd.client.buffers`, the clients' mechanism too); False where not applied."""
    return buffers.reuse_large_buffers(max_message_bytes, top_pad=64 << 20)


def limit_malloc_arenas(arenas: int) -> bool:
    """Let glibc create at most ``arenas`` malloc arenas (0: its default); False where not applied.

    Not applied where ``MALLOC_ARENA_MAX`` is set (glibc read it at start: the
    operator's choice stands) or where malloc is not glibc's. Arenas that already
    exist stay; threads started afterwards share the bounded set, so call it
    before the server's threads start."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = getattr(buffers.libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Collect cyclic garbage, then give the free pages of every malloc arena back to the OS (glibc ``malloc_trim(0)``).

    False where there is no malloc_trim. The collection first: memory held by
    reference cycles is freed only by the cyclic collector, which an idle server
    (allocating nothing) never starts. With it, the idle RSS after eight
    [512, 128256] requests was 0.33-0.36 GB in every run, against 1.2-1.5 GB
    in half the runs without. (What held those requests' bytes was found
    later, and was not a cycle: cancelled asyncio timers kept copies of the
    calls' contexts, with their tensor views, until their deadlines; see
    :mod:`lossd.server.wire_request`.)"""
    gc.collect()
    trim = getattr(buffers.libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


class IdleTrim:
    """Called when the last request in progress ends: once the server has been idle for ``delay`` seconds, trim the heap.

    Idle for the whole ``delay``: a call that starts and ends meanwhile moves
    the trim to ``delay`` after its end. Checking only at the moment the timer
    fired, a steady loop of sequential calls (idle between two of them for a
    fraction of a millisecond) was trimmed every few seconds, mid-loop: the
    collection holds the GIL (the event loop waits), and the trim gives back the
    large buffers the next request reuses (lossd.server.allocator).

    ``holding()`` is the bytes of request tensors still held after their
    responses (the monitoring work queued behind them): while it is not 0 the
    trim waits another ``delay``, so that the tensors it frees are given back
    too (a trim before that gives back none of them).

    Runs on the event loop; the trim itself (it walks the arenas) runs on the
    loop's default executor. One trim at most is pending at a time.
    """

    def __init__(self, idle: Callable[[], bool], delay: float = 2.0, holding: Callable[[], int] | None = None) -> None:
        self.idle = idle
        self.delay = delay
        self.holding = holding
        self._pending: asyncio.TimerHandle | None = None
        self._last_end = 0.0  # loop time of the last call's end

    def __call__(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_end = loop.time()
        if self._pending is None:
            self._arm(loop, self.delay)

    def _arm(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        # An empty context: the timer would otherwise keep a copy of the ending call's until it fires.
        self._pending = loop.call_later(delay, self._fire, context=contextvars.Context())

    def _fire(self) -> None:
        self._pending = None
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_end
        if quiet < self.delay:  # a call ended meanwhile: idle for the whole delay after it
            self._arm(loop, self.delay - quiet)
            return
        if not self.idle():
            return  # a request is in progress: its end arms the next trim
        if self.holding is not None and self.holding() > 0:
            self._arm(loop, self.delay)
            return
        loop.run_in_executor(None, release_free_memory)

    def cancel(self) -> None:
        """Drop a pending trim (the server is stopping)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def torch_threads_for(compute_threads: int, cores: int, configured: int | None = None) -> int:
    """torch's intra-op threads: ``configured``, or cores // compute threads, so that they never oversubscribe the cores."""
    return configured if configured is not None else max(1, cores // max(1, compute_threads))


def match_torch_threads() -> None:
    """Give this thread the process's torch intra-op thread count (``lossd serve`` sets it at start).

    OpenMP keeps the count per thread: a new thread starts from the default,
    and then even a [64, 10] exp forks a team of helper threads. Measured on
    2 cores with the server's setting (1): 190 µs for an exp and a sum instead of 6 µs,
    and a helper spinning on the other core, the event loop's. Every lossd
    thread pool runs this as its initializer."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


def init_compute_thread() -> None:
    """The initializer of every lossd thread pool: torch's thread count (see above), and the whole CPU set (lossd.server.affinity)."""
    affinity.free_this_thread()
    match_torch_threads()


def set_torch_threads(compute_threads: int, configured: int | None = None) -> int:
    """Set torch's intra-op threads for ``compute_threads`` compute threads per lane; return the number set."""
    import torch  # here: the buffer tuning above needs no torch

    threads = torch_threads_for(compute_threads, available_cores(), configured)
    torch.set_num_threads(threads)
    log.debug("torch intra-op threads: %d (%d compute threads per lane)", threads, compute_threads)
    return threads
