"""The allocator tuning applies on glibc and says so; it never fails the server elsewhere."""

from __future__ import annotations

import asyncio
import gc
import platform
import subprocess
import sys
import time
import weakref

import pytest

from lossd.server import allocator
from lossd.server.admission import Admission, AdmissionLimits
from lossd.server.allocator import IdleTrim

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_reuse_large_buffers_in_a_fresh_process() -> None:
    # A subprocess: the tuning is process-wide and must not leak into the test session's own allocator.
    code = "from lossd.server.allocator import reuse_large_buffers; print(reuse_large_buffers(512 << 20))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    expected = "True" if GLIBC else "False"
    assert out == expected


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_free_memory_gives_kept_buffers_back_to_the_os() -> None:
    # With the reuse thresholds a freed 256 MiB buffer stays resident; the trim gives it back.
    code = """
import re
from pathlib import Path
from lossd.server.allocator import release_free_memory, reuse_large_buffers
def rss(): return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) << 10
assert reuse_large_buffers(512 << 20)
before = rss()
buffers = [bytearray(1 << 20) for _ in range(256)]  # touched: zero-filled
del buffers
kept = rss()
assert release_free_memory()
print(kept - before, rss() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    kept, after = (int(v) for v in out)
    assert kept > 200 << 20  # the freed buffers were kept for reuse
    assert after < 32 << 20  # and given back by the trim


def test_idle_trim_fires_once_after_the_delay_and_only_if_still_idle() -> None:
    async def main() -> list[str]:
        state = {"idle": True}
        events: list[str] = []
        trim = IdleTrim(lambda: events.append("checked") or state["idle"], delay=0.05)
        trim()
        trim()  # one pending trim at most
        await asyncio.sleep(0.15)
        state["idle"] = False
        trim()
        await asyncio.sleep(0.15)
        trim()
        trim.cancel()  # a stopping server drops the pending one
        await asyncio.sleep(0.15)
        return events

    assert asyncio.run(main()) == ["checked", "checked"]


def test_idle_trim_waits_for_a_whole_quiet_delay_after_the_last_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential calls leave the server idle for moments between them: none of those moments is a trim."""
    trims: list[float] = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: trims.append(time.monotonic()) or True)

    async def main() -> float:
        trim = IdleTrim(lambda: True, delay=0.1)
        for _ in range(8):  # a call ends every 40 ms, each idle at the moment the previous timer fires
            trim()
            await asyncio.sleep(0.04)
        last_end = time.monotonic() - 0.04
        assert trims == []
        await asyncio.sleep(0.2)
        return last_end

    last_end = asyncio.run(main())
    assert len(trims) == 1 and trims[0] - last_end >= 0.1 - 0.01


def test_idle_trim_waits_while_request_tensors_are_still_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitoring queued behind a burst holds its tensors: a trim before they are freed gives back none of them."""
    trims: list[int] = []
    held = {"bytes": 3 << 20}
    monkeypatch.setattr(allocator, "release_free_memory", lambda: trims.append(held["bytes"]) or True)

    async def main() -> None:
        trim = IdleTrim(lambda: True, delay=0.05, holding=lambda: held["bytes"])
        trim()
        await asyncio.sleep(0.17)  # three checks: still held, no trim
        assert trims == []
        held["bytes"] = 0
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert trims == [0]  # once, after the tensors were freed


def test_the_idle_release_frees_what_a_reference_cycle_held() -> None:
    """An idle server allocates nothing that would start the cyclic collector: the release runs it."""

    class Call:  # a finished call's objects, pointing at each other, holding its request
        def __init__(self) -> None:
            self.request = bytearray(8 << 20)
            self.me = self

    enabled = gc.isenabled()
    gc.disable()
    try:
        call = Call()
        gone = weakref.ref(call)
        del call
        assert gone() is not None  # held by its own cycle
        allocator.release_free_memory()
        assert gone() is None
    finally:
        if enabled:
            gc.enable()


def test_admission_calls_its_idle_hook_when_the_last_call_ends() -> None:
    async def main() -> list[int]:
        admission = Admission(AdmissionLimits())
        seen: list[int] = []

        class Hook(IdleTrim):
            def __call__(self) -> None:
                seen.append(admission.active)

        admission.on_idle = Hook(admission.idle)
        async with admission.call():
            async with admission.call():
                pass
            assert seen == []  # one call still in progress
        admission.close()
        return seen

    assert asyncio.run(main()) == [0]


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_malloc_arenas_bounded_unless_the_operator_set_malloc_arena_max() -> None:
    # Threads started after the bound share it: 8 allocating threads, at most 2 arenas (a thread arena's heap is a 64 MiB-aligned mapping).
    code = """
import re, sys, threading
from lossd.server.allocator import limit_malloc_arenas
applied = limit_malloc_arenas(int(sys.argv[1]))
def work():
    keep = [bytearray(4096) for _ in range(2000)]
    barrier.wait()
barrier = threading.Barrier(8)
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
# A thread arena's heap is a 64 MiB reservation at a 64 MiB-aligned address: its used part rw,
# the rest (when any) ---p right after it. Alignment alone also matches, now and then, some other
# anonymous mapping (about one address in 16,384 is aligned so), so the whole reservation is checked.
maps = []
for line in open("/proc/self/maps"):
    fields = line.split()
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    maps.append((lo, hi, fields[1], len(fields)))
heaps = 0
for i, (lo, hi, perms, width) in enumerate(maps):
    if lo % (64 << 20) or width != 5 or not perms.startswith("rw"):
        continue
    end = hi
    if i + 1 < len(maps) and maps[i + 1][0] == hi and maps[i + 1][2] == "---p":
        end = maps[i + 1][1]
    heaps += end - lo == 64 << 20
print(applied, heaps)
"""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run = lambda arenas, extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(arenas)], capture_output=True, text=True, check=True, env={**env, **extra}
    ).stdout.split()
    applied, heaps = run(2, {})
    assert applied == "True" and int(heaps) <= 1  # the main arena is the heap; one thread arena at most besides it
    applied, heaps = run(0, {})
    assert applied == "False" and int(heaps) >= 4  # glibc's default: a thread arena per allocating thread
    applied, _ = run(2, {"MALLOC_ARENA_MAX": "4"})
    assert applied == "False"  # the operator's setting stands
