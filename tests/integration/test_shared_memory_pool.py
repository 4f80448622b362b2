"""Pooled shared-memory segments: reused only when the server is done with them, never read across calls."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from integration.conftest import ServerThread, start_server

from lossd.client import AsyncClient, Client
from lossd.client.errors import InvalidArgumentError
from lossd.client.shared_memory import SEGMENT_DIRECTORY, SegmentPool, SharedBatch
from lossd.server.shared_memory import MAPPINGS, PRUNE_SECONDS
from lossd.v1 import lossd_pb2 as pb

pytestmark = pytest.mark.skipif(not SEGMENT_DIRECTORY.is_dir(), reason="POSIX shared memory (/dev/shm) is Linux-only")

FUNCTIONS = ["cross_entropy", "accuracy", "entropy"]


def batch(seed: int, rows: int = 256, classes: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((rows, classes), dtype=np.float32), "labels": rng.integers(0, classes, rows)}


def values(result: object) -> dict[str, dict[str, float]]:
    return {alias: dict(r.values) for alias, r in result.items()}  # type: ignore[attr-defined]


def segments_of(pid: int) -> list[str]:
    return sorted(p.name for p in SEGMENT_DIRECTORY.glob(f"lossd_{pid}_*"))


def wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def shared() -> Iterator[ServerThread]:
    server = start_server(allow_shared_memory=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(shared: ServerThread) -> dict[int, dict[str, dict[str, float]]]:
    """The values over the wire of batches 0..7 (the reference every shared-memory answer must equal bit for bit)."""
    with Client(shared.address) as wire:
        return {seed: values(wire.evaluate(batch(seed), FUNCTIONS)) for seed in range(8)}


def server_done(client: Client) -> bool:
    """Whether the server has let go of every idle segment (its shared locks are gone)."""
    for name in client.core.segments.idle_names():
        fd = os.open(SEGMENT_DIRECTORY / name, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
    return True


def test_a_segment_is_reused_for_later_batches_with_each_batchs_values(
    shared: ServerThread, expected: dict[int, dict[str, dict[str, float]]]
) -> None:
    with Client(shared.address, shared_memory=True) as client:
        assert values(client.evaluate(batch(0), FUNCTIONS)) == expected[0]
        first = client.core.segments.idle_names()
        assert len(first) == 1
        for seed in (1, 2, 3):
            wait_for(lambda: server_done(client))
            assert values(client.evaluate(batch(seed), FUNCTIONS)) == expected[seed]
            assert client.core.segments.idle_names() == first  # the same segment, rewritten
        small = {"logits": batch(4)["logits"][:128], "labels": batch(4)["labels"][:128]}
        wait_for(lambda: server_done(client))
        with Client(shared.address) as wire:
            assert values(client.evaluate(small, FUNCTIONS)) == values(wire.evaluate(small, FUNCTIONS))  # a smaller batch fits too
        assert segments_of(os.getpid()) == first
    assert segments_of(os.getpid()) == []  # close() unlinks the pool


def test_a_segment_the_server_still_reads_is_never_overwritten(
    shared: ServerThread, expected: dict[int, dict[str, dict[str, float]]]
) -> None:
    with Client(shared.address, shared_memory=True) as client:
        client.evaluate(batch(0), FUNCTIONS)
        [held] = client.core.segments.idle_names()
        wait_for(lambda: server_done(client))
        before = (SEGMENT_DIRECTORY / held).read_bytes()
        # What a server does while monitoring still reads a request's tensors after the response: a shared lock.
        fd = os.open(SEGMENT_DIRECTORY / held, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            assert values(client.evaluate(batch(5), FUNCTIONS)) == expected[5]
            assert (SEGMENT_DIRECTORY / held).read_bytes() == before  # another segment served the call
            assert held in client.core.segments.idle_names() and len(client.core.segments.idle_names()) == 2
        finally:
            os.close(fd)
        wait_for(lambda: server_done(client))
        assert values(client.evaluate(batch(6), FUNCTIONS)) == expected[6]
    assert segments_of(os.getpid()) == []


def test_threads_sharing_a_client_each_get_their_own_batchs_values(
    shared: ServerThread, expected: dict[int, dict[str, dict[str, float]]]
) -> None:
    wrong: list[tuple[int, object]] = []
    with Client(shared.address, shared_memory=True) as client:
        client.core.segments.max_segments = 2  # fewer than the threads: segments are reused and evicted under contention

        def caller(offset: int) -> None:
            for i in range(6):
                seed = (offset + i) % 8
                got = values(client.evaluate(batch(seed), FUNCTIONS))
                if got != expected[seed]:
                    wrong.append((seed, got))

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(client.core.segments.idle_names()) <= 2  # bounded, however many calls
    assert wrong == []
    assert segments_of(os.getpid()) == []


def test_async_client_reuses_its_segments(shared: ServerThread, expected: dict[int, dict[str, dict[str, float]]]) -> None:
    async def main() -> list[dict[str, dict[str, float]]]:
        async with AsyncClient(shared.address, shared_memory=True) as client:
            return [values(r) for r in await asyncio.gather(*(client.evaluate(batch(s), FUNCTIONS) for s in range(8)))]

    assert asyncio.run(main()) == [expected[s] for s in range(8)]
    assert segments_of(os.getpid()) == []


def test_the_server_refuses_a_segment_still_being_written(shared: ServerThread) -> None:
    with SharedBatch({"logits": np.zeros((4, 3), np.float32)}) as segment, Client(shared.address) as client:
        fd = os.open(segment.path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a client still writing
        try:
            request = pb.EvaluateRequest(tensors=segment.tensors, functions=[pb.FunctionSpec(name="entropy")])
            with pytest.raises(InvalidArgumentError) as info:
                client.evaluate_request(request)
        finally:
            os.close(fd)
        assert info.value.violations[0].field == "tensors.logits.shared_memory.name"
        assert "locked for writing" in info.value.violations[0].description
        assert client.evaluate_request(request)  # written: accepted


def test_the_server_drops_its_mappings_of_unlinked_segments(shared: ServerThread) -> None:
    with Client(shared.address, shared_memory=True) as client:
        client.evaluate(batch(0), FUNCTIONS)
        assert len(MAPPINGS) >= 1
    wait_for(lambda: len(MAPPINGS) == 0, seconds=PRUNE_SECONDS * 5 + 10)  # the client unlinked them; the server lets go


def test_the_pool_is_bounded_and_a_failed_call_unlinks_its_segment() -> None:
    pool = SegmentPool(max_segments=1)
    a, b = pool.acquire(100), pool.acquire(100)
    pool.release(a, reusable=True)
    pool.release(b, reusable=True)  # over the bound: the least recently used goes
    assert pool.idle_names() == [b.name] and not os.path.exists(a.path)
    with pytest.raises(RuntimeError), SharedBatch(batch(0), pool) as failed:
        raise RuntimeError("the call failed")
    assert not os.path.exists(failed.path) and pool.idle_names() == [b.name]
    pool.close()
    assert not os.path.exists(b.path) and pool.idle_names() == []


def test_every_dtype_gives_the_wire_values(shared: ServerThread) -> None:
    import torch

    rng = np.random.default_rng(9)
    logits = rng.standard_normal((1000, 100), dtype=np.float32)  # every case over MIN_SHARED_BYTES
    labels = rng.integers(0, 100, 1000)
    cases = [
        {"logits": torch.from_numpy(logits).to(torch.bfloat16), "labels": labels},
        {"logits": logits.astype(np.float16), "labels": labels.astype(np.int32)},
        {"logits": logits.astype(">f8"), "labels": labels},  # big-endian: written little-endian
        {"logits": np.asfortranarray(logits), "labels": labels},  # not C-contiguous
    ]
    with Client(shared.address, shared_memory=True) as client, Client(shared.address) as wire:
        for tensors in cases:
            assert values(client.evaluate(tensors, FUNCTIONS)) == values(wire.evaluate(tensors, FUNCTIONS)), tensors["logits"].dtype
        assert client.core.segments.idle_names()  # they went through shared memory


class LateReader:
    """A subscriber that, like monitoring after the response, reads each batch's logits a while later, on its own thread."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self._pending: list[threading.Thread] = []

    def __call__(self, event: object) -> None:
        batch = getattr(event, "batch", None)
        if batch is None or "logits" not in batch.tensors:
            return
        logits = batch.tensors["logits"]

        def read_later() -> None:
            time.sleep(0.3)  # the client has its response and sends its next batch meanwhile
            self.digests.append(hashlib.sha256(logits.numpy().tobytes()).hexdigest())

        thread = threading.Thread(target=read_later)
        self._pending.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self._pending:
            thread.join(30)


def test_monitoring_after_the_response_reads_its_own_calls_data() -> None:
    reader = LateReader()
    server = start_server(allow_shared_memory=True, subscribers=[reader])
    try:
        batches = [batch(seed) for seed in range(5)]
        with Client(server.address, shared_memory=True) as client:
            for b in batches:
                client.evaluate(b, ["cross_entropy"])
            reader.join()
        assert sorted(reader.digests) == sorted(hashlib.sha256(b["logits"].tobytes()).hexdigest() for b in batches)
    finally:
        server.stop()
