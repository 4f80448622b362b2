"""The sweep of segments left by clients killed mid-request: only dead pids, only this user's lossd segments."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from lossd.client.settings import is_loopback
from lossd.client.shared_memory import sweep_stale_segments


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_unlinks_segments_of_dead_processes_only(tmp_path: Path) -> None:
    dead = tmp_path / f"lossd_{dead_pid()}_{uuid.uuid4().hex}"
    alive = tmp_path / f"lossd_{os.getpid()}_{uuid.uuid4().hex}"
    other = tmp_path / f"other_{dead_pid()}_{uuid.uuid4().hex}"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    assert sweep_stale_segments(tmp_path) == [dead.name]
    assert not dead.exists() and alive.exists() and other.exists()


def test_sweep_of_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    assert sweep_stale_segments(tmp_path / "absent") == []


def test_local_addresses() -> None:
    for address in ("127.0.0.1:50051", "127.1.2.3:1", "localhost:50051", "[::1]:50051", "unix:/run/lossd.sock", "unix:///run/x"):
        assert is_loopback(address), address
    for address in ("10.0.0.1:50051", "lossd.example:50051", "[2001:db8::1]:50051", "0.0.0.0:50051"):
        assert not is_loopback(address), address


FORKED = """
import os, sys
import numpy as np
from lossd.client.shared_memory import SegmentPool, SharedBatch
pool = SegmentPool()
with SharedBatch({"x": np.ones(1000, np.float32)}, pool) as batch:
    pass
pid = os.fork()
if pid == 0:  # a forked child (a DataLoader worker, say): its exit runs the finalizers, which must leave the parent's segment alone
    with SharedBatch({"x": np.zeros(1000, np.float32)}, pool) as child:
        assert child.name != batch.name and child.name.startswith(f"lossd_{os.getpid()}_")
    sys.exit(0)
assert os.waitpid(pid, 0)[1] == 0
assert os.path.exists(batch.path), "the child unlinked its parent's segment"
with SharedBatch({"x": np.full(1000, 2.0, np.float32)}, pool) as again:
    assert again.name == batch.name
pool.close()
assert not os.path.exists(batch.path)
"""


def test_a_forked_child_never_touches_its_parents_segments() -> None:
    subprocess.run([sys.executable, "-c", FORKED], check=True, timeout=60)
