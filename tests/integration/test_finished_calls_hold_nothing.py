"""A finished call keeps none of its request's bytes: nothing the server scheduled during it holds them afterwards.

asyncio copies the current context into every callback and timer it
schedules, and a cancelled timer keeps that copy until its deadline. Each
message of a stream used to schedule the 300 s idle timeout of the next read
with the previous message's tensor views in its context
(:mod:`lossd.server.wire_request`): a finished stream of eight 32 MiB parts
stayed resident, and back-to-back [512, 128256] batches piled up to about
four payloads over the server's idle RSS.

Measured with tracemalloc, as the memory the server's own frames allocated
(the deserializer runs in them) that is still live after the response: the
client's buffers, in this same process, are left out by the filter.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from lossd.client import Client

PART_BYTES = 1 << 20
ROWS, CLASSES = 1024, 1024  # 4 MiB of float32 logits: four 1 MiB parts in a stream
SERVER_FRAMES = [tracemalloc.Filter(True, "*lossd/server/*")]


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start(40)  # deep enough to reach the server's frames from grpc's deserializer
    yield
    tracemalloc.stop()


def _held_by_server_frames() -> int:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(SERVER_FRAMES)
    return sum(stat.size for stat in snapshot.statistics("filename"))


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"logits": rng.standard_normal((ROWS, CLASSES), dtype=np.float32), "labels": rng.integers(0, CLASSES, ROWS)}


@pytest.mark.parametrize("chunk_bytes", [PART_BYTES, None], ids=["stream_of_parts", "one_request"])
def test_a_finished_call_keeps_none_of_its_tensor_bytes(address: str, traced: None, chunk_bytes: int | None) -> None:
    batch = _batch()
    with Client(address, timeout=60, chunk_bytes=chunk_bytes) as client:
        client.evaluate(batch, "cross_entropy")  # warm: the server's one-time allocations are not this call's
        time.sleep(0.2)
        before = _held_by_server_frames()
        for _ in range(3):
            client.evaluate(batch, "cross_entropy")
        time.sleep(0.2)  # the server's loop finishes the calls (the client has its responses a little before)
        after = _held_by_server_frames()
    payload = batch["logits"].nbytes
    # Before the fix, every part of the three streams was still held here (12.0 MiB).
    assert after - before < PART_BYTES, f"{(after - before) / 2**20:.1f} MiB of {payload / 2**20:.0f} MiB requests still held"
