"""The allocator tuning applies on glibc and says so; it never fails the server elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys


def test_reuse_large_buffers_in_a_fresh_process() -> None:
    # A subprocess: the tuning is process-wide and must not leak into the test session's own allocator.
    code = "from lossd.server.allocator import reuse_large_buffers; print(reuse_large_buffers(512 << 20))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    expected = "True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False"
    assert out == expected
