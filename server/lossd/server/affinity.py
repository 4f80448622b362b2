"""``LOSSD_PIN_EVENT_LOOP``: the event loop and gRPC's threads of ``lossd serve`` on one core, compute threads on all.

A small request wakes gRPC's poller thread, which wakes the event loop, which
answers it inline (:mod:`lossd.server.admission`). Left to the scheduler,
those threads land on whichever core is free and run with cold caches; on this
2-core machine that cost a [64, 10] call more than its own work. Pinned (the
thread that calls :func:`pin_event_loop`, and every thread it starts from then
on: gRPC's poller, timer and event-engine threads), the sequential p50 went
from 1.43-1.97 ms to 1.22-1.54 ms in three interleaved runs, and from
1.25-1.35 to 1.16-1.25 ms in three more, in a quieter hour. Compute and
monitoring threads release the pin when they start (:func:`free_this_thread`),
so a large request's torch threads still use every core.

It is off by default: on cores shared with other work (a pod without
exclusive CPUs), a pinned loop cannot move away from a busy core.
Standard library only: a worker pins itself before any import starts a thread.
"""

from __future__ import annotations

import os

__all__ = ["free_this_thread", "pin_event_loop"]

_cpu_set: set[int] | None = None  # the process's CPU set before it was pinned


def pin_event_loop(index: int) -> int:
    """Run this thread, and the threads it starts from now on, on the ``index``-th core of the CPU set (round robin)."""
    global _cpu_set
    cores = sorted(os.sched_getaffinity(0))
    _cpu_set = set(cores)
    core = cores[index % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def free_this_thread() -> None:
    """Give this thread the process's whole CPU set back (compute and monitoring threads call it first); a no-op unless pinned."""
    if _cpu_set is not None:
        os.sched_setaffinity(0, _cpu_set)
