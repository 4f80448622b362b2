"""The allocator tuning applies on glibc and says so; it never fails the server elsewhere."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys

import pytest

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
