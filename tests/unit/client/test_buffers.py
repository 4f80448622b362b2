"""Clients keep large freed buffers for the next message (lossd.client.buffers), once per process, never lowering the server's."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lossd.client import buffers
from lossd.client.settings import reuse_large_buffers_enabled

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _fresh(code: str, **env: str) -> str:
    # A subprocess: the tuning is process-wide and must start from glibc's defaults.
    import os

    environ = {k: v for k, v in os.environ.items() if k != "LOSSD_REUSE_LARGE_BUFFERS" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **env}, check=True)
    return done.stdout.strip()


def test_the_setting_defaults_to_on_and_names_itself_when_malformed() -> None:
    assert reuse_large_buffers_enabled({})
    assert reuse_large_buffers_enabled({"LOSSD_REUSE_LARGE_BUFFERS": "true"})
    assert not reuse_large_buffers_enabled({"LOSSD_REUSE_LARGE_BUFFERS": "false"})
    with pytest.raises(ValueError, match="LOSSD_REUSE_LARGE_BUFFERS: expected true or false, got 'sometimes'"):
        reuse_large_buffers_enabled({"LOSSD_REUSE_LARGE_BUFFERS": "sometimes"})


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_a_client_raises_the_thresholds_once_and_never_below_the_servers() -> None:
    code = """
from lossd.client import Client, buffers
from lossd.server.allocator import reuse_large_buffers
Client("127.0.0.1:1", chunk_bytes=8 << 20)
first = buffers.applied_threshold()
assert reuse_large_buffers(512 << 20)
Client("127.0.0.1:1")  # a client opened in a process serving lossd keeps the server's thresholds
print(first, buffers.applied_threshold())
"""
    first, after = (int(v) for v in _fresh(code).split())
    assert first == 16 << 20  # twice the client's largest message: its request and gRPC's copy
    assert after == 512 << 20


@pytest.mark.parametrize(
    "env",
    [
        {"LOSSD_REUSE_LARGE_BUFFERS": "false"},
        {"MALLOC_TRIM_THRESHOLD_": "1000000"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1000000"},
    ],
    ids=["turned-off", "glibc-variable", "glibc-tunable"],
)
def test_the_operators_choice_leaves_malloc_alone(env: dict[str, str]) -> None:
    code = "from lossd.client import Client, buffers; Client('127.0.0.1:1'); print(buffers.applied_threshold())"
    assert _fresh(code, **env) == "0"


def test_elsewhere_than_glibc_nothing_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "libc", lambda: None)
    monkeypatch.setattr(buffers, "_applied", 0)
    assert not buffers.reuse_large_buffers(64 << 20, environ={})
    assert buffers.applied_threshold() == 0
