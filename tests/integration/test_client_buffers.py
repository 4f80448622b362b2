"""A client sending 16 MB batches reuses its freed buffers: no page faults per call (lossd.client.buffers)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's")

CLIENT = """
import resource, sys
import numpy as np
from lossd.client import Client
rng = np.random.default_rng(0)
batch = {"logits": rng.standard_normal((4096, 1024), dtype=np.float32), "labels": rng.integers(0, 1024, 4096)}
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with Client(sys.argv[1]) as client:
    for _ in range(2):
        client.evaluate(batch, ["cross_entropy"])
    before = faults()
    for _ in range(4):
        client.evaluate(batch, ["cross_entropy"])
print((faults() - before) // 4)
"""


def _faults_per_call(address: str, **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "LOSSD_REUSE_LARGE_BUFFERS" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CLIENT, address], capture_output=True, text=True, env={**environ, **env}, check=True)
    return int(out.stdout)


def test_a_16_mb_evaluate_faults_in_no_fresh_buffer(address: str) -> None:
    # A fresh 16.8 MB buffer is 4,100 pages; glibc's defaults fault in two per call (the request and gRPC's copy).
    assert _faults_per_call(address) < 1000
