"""LOSSD_PIN_EVENT_LOOP: the pinning thread and its later threads on one core; compute threads back on the whole set."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lossd.server import affinity
from lossd.server.allocator import init_compute_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")


def test_pinned_loop_threads_inherit_the_core_and_compute_threads_get_every_core_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(affinity, "_cpu_set", None)  # the module's record of the set, restored after the test
    cores = os.sched_getaffinity(0)
    seen: dict[str, set[int]] = {}

    def loop_thread() -> None:  # stands for lossd serve's main thread: pins itself, then starts the others
        core = affinity.pin_event_loop(1)
        seen["pinned"] = os.sched_getaffinity(0)
        child = threading.Thread(target=lambda: seen.__setitem__("grpc-like", os.sched_getaffinity(0)))
        child.start()
        child.join()
        with ThreadPoolExecutor(1, initializer=init_compute_thread) as pool:
            seen["compute"] = pool.submit(os.sched_getaffinity, 0).result()
        seen["core"] = {core}

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join()
    assert seen["pinned"] == seen["grpc-like"] == seen["core"] == {sorted(cores)[1 % len(cores)]}
    assert seen["compute"] == cores
    assert os.sched_getaffinity(0) == cores  # the test's own thread was never pinned


def test_free_this_thread_is_a_no_op_unless_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(affinity, "_cpu_set", None)
    before = os.sched_getaffinity(0)
    affinity.free_this_thread()
    assert os.sched_getaffinity(0) == before
