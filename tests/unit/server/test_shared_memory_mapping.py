"""The server's side of a shared-memory segment: a shared lock while its tensors live, kept mappings, bit-for-bit views."""

from __future__ import annotations

import fcntl
import gc
import os

import numpy as np
import pytest
import torch

from lossd.client.codec import to_numpy
from lossd.client.shared_memory import SEGMENT_DIRECTORY, SegmentPool, SharedBatch
from lossd.server.shared_memory import MAPPINGS, shared_tensor
from lossd.v1 import lossd_pb2 as pb

pytestmark = pytest.mark.skipif(not SEGMENT_DIRECTORY.is_dir(), reason="POSIX shared memory (/dev/shm) is Linux-only")


def writable(path: str) -> bool:
    """Whether a client could take the write lock now (no server holds its shared lock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_the_server_holds_its_lock_exactly_as_long_as_the_tensor() -> None:
    logits = np.arange(4096 * 8, dtype=np.float32).reshape(4096, 8)
    with SharedBatch({"logits": logits}) as segment:
        tensor = shared_tensor(segment.tensors["logits"], "tensors.logits", allowed=True)
        view = tensor[10:20]  # anything derived keeps it too
        del tensor
        gc.collect()
        assert torch.equal(view, torch.from_numpy(logits[10:20]))
        assert not writable(segment.path)
        del view
        assert writable(segment.path)


def test_a_kept_mapping_is_reused_and_sees_the_segments_new_contents() -> None:
    pool = SegmentPool()
    first = {"logits": np.full((64, 256), 1.5, np.float32)}
    second = {"logits": np.full((64, 256), -2.25, np.float32)}
    with SharedBatch(first, pool) as a:
        t = shared_tensor(a.tensors["logits"], "tensors.logits", allowed=True)
        assert torch.equal(t, torch.from_numpy(first["logits"]))
        kept = len(MAPPINGS)
        del t
    with SharedBatch(second, pool) as b:
        assert b.name == a.name  # the pooled segment, rewritten
        t = shared_tensor(b.tensors["logits"], "tensors.logits", allowed=True)
        assert torch.equal(t, torch.from_numpy(second["logits"])) and len(MAPPINGS) == kept
        del t
    pool.close()
    MAPPINGS.clear()
    assert len(MAPPINGS) == 0


def test_bfloat16_in_shared_memory_is_the_clients_bits() -> None:
    values = torch.randn(300, 257).to(torch.bfloat16)
    with SharedBatch({"logits": to_numpy(values)}) as segment:
        assert segment.tensors["logits"].dtype == pb.BFLOAT16
        t = shared_tensor(segment.tensors["logits"], "tensors.logits", allowed=True)
        assert t.dtype == torch.bfloat16 and torch.equal(t.view(torch.int16), values.view(torch.int16))
        del t
