"""Shared memory for co-located clients: tensors in a POSIX segment, only its name on the wire."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.conftest import ServerThread, serving_with
from integration.wire_recording import RecordingInterceptor

from lossd.client import AsyncClient, Client
from lossd.client.errors import InvalidArgumentError, LossdError
from lossd.client.settings import is_loopback
from lossd.client.shared_memory import SEGMENT_DIRECTORY, SharedBatch
from lossd.v1 import lossd_pb2 as pb

pytestmark = pytest.mark.skipif(not SEGMENT_DIRECTORY.is_dir(), reason="POSIX shared memory (/dev/shm) is Linux-only")

FUNCTIONS = ["cross_entropy", "accuracy", "ece:n_bins=15"]


def batch(rows: int = 1024, classes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((rows, classes), dtype=np.float32), "labels": rng.integers(0, classes, rows)}


def segments_of(pid: int) -> list[str]:
    return sorted(p.name for p in SEGMENT_DIRECTORY.glob(f"lossd_{pid}_*"))


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[ServerThread, RecordingInterceptor]]:
    yield from serving_with(RecordingInterceptor(), allow_shared_memory=True)


def values(result: object) -> dict[str, dict[str, float]]:
    return {alias: dict(r.values) for alias, r in result.items()}  # type: ignore[attr-defined]


def test_shared_memory_gives_the_wire_values_and_sends_only_names(shared: tuple[ServerThread, RecordingInterceptor]) -> None:
    server, recorder = shared
    data = batch()
    with Client(server.address, shared_memory=True) as client, Client(server.address) as wire:
        assert client.core.shared_memory
        recorder.clear()
        out = client.evaluate(data, FUNCTIONS)
        assert max(recorder.of("Evaluate")) < 1024  # names, offsets, shapes: not the 4 MB of logits
        assert values(out) == values(wire.evaluate(data, FUNCTIONS))
    expected = float(F.cross_entropy(torch.from_numpy(data["logits"]).double(), torch.from_numpy(data["labels"])))
    assert out["cross_entropy"].value == pytest.approx(expected, rel=1e-6)
    assert segments_of(os.getpid()) == []  # close() unlinks the client's pooled segments


def test_async_client_uses_shared_memory(shared: tuple[ServerThread, RecordingInterceptor]) -> None:
    import asyncio

    server, recorder = shared
    data = batch(seed=1)

    async def main() -> dict[str, dict[str, float]]:
        async with AsyncClient(server.address, shared_memory=True) as client:
            recorder.clear()
            out = await client.evaluate(data, FUNCTIONS)
            assert max(recorder.of("Evaluate")) < 1024
            return values(out)

    with Client(server.address) as wire:
        assert asyncio.run(main()) == values(wire.evaluate(data, FUNCTIONS))
    assert segments_of(os.getpid()) == []


def test_a_refusing_server_gets_the_wire_with_a_logged_reason(address: str, caplog: pytest.LogCaptureFixture) -> None:
    data = batch(seed=2)
    with caplog.at_level(logging.WARNING, logger="lossd.client"), Client(address, shared_memory=True) as client:
        out = client.evaluate(data, "cross_entropy")
        assert not client.core.shared_memory
        with Client(address) as wire:
            assert out["cross_entropy"].value == wire.evaluate(data, "cross_entropy")["cross_entropy"].value
    assert any("LOSSD_ALLOW_SHARED_MEMORY" in r.getMessage() for r in caplog.records)
    assert segments_of(os.getpid()) == []


def test_a_remote_server_gets_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1:1") and is_loopback("localhost:1") and is_loopback("[::1]:1")
    assert is_loopback("unix:/tmp/lossd.sock") and not is_loopback("10.1.2.3:50051")
    with caplog.at_level(logging.WARNING, logger="lossd.client"), Client("192.0.2.1:50051", shared_memory=True) as client:
        assert not client.core.shared_memory
    assert any("not on this host" in r.getMessage() for r in caplog.records)


def test_segments_are_readable_by_their_user_only() -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        with SharedBatch(batch(rows=4, classes=3)) as segment:
            info = os.stat(segment.path)
            assert info.st_mode & 0o777 == 0o600 and info.st_uid == os.getuid()
    finally:
        os.umask(old)
    assert not Path(segment.path).exists()


def refused(client: Client, tensor: pb.Tensor) -> InvalidArgumentError:
    request = pb.EvaluateRequest(tensors={"logits": tensor}, functions=[pb.FunctionSpec(name="entropy")])
    with pytest.raises(InvalidArgumentError) as info:
        client.evaluate_request(request)
    return info.value


def test_the_server_validates_every_region(shared: tuple[ServerThread, RecordingInterceptor], address: str) -> None:
    server, _ = shared
    with SharedBatch({"logits": np.zeros((4, 3), np.float32)}) as segment:
        good = segment.tensors["logits"]
        with Client(server.address) as client:

            def region(**changes: object) -> pb.Tensor:
                t = pb.Tensor()
                t.CopyFrom(good)
                for key, value in changes.items():
                    setattr(t.shared_memory, key, value)
                return t

            for name in ("../" + segment.name, "lossd_/etc/passwd", "tmp_x", "lossd_absent_0"):
                exc = refused(client, region(name=name))
                assert [v.field for v in exc.violations] == ["tensors.logits.shared_memory.name"], exc
            exc = refused(client, region(offset=64))
            assert "past the end" in exc.violations[0].description
            exc = refused(client, region(byte_size=4))
            assert exc.violations[0].field == "tensors.logits.shared_memory.byte_size"
            with_data = region()
            with_data.data = b"\0" * 48
            assert refused(client, with_data).violations[0].field == "tensors.logits.data"
            assert client.evaluate_request(pb.EvaluateRequest(tensors={"logits": good}, functions=[pb.FunctionSpec(name="entropy")]))
        with Client(address) as disabled:
            exc = refused(disabled, good)
            assert exc.violations[0].field == "tensors.logits.shared_memory"
            assert "LOSSD_ALLOW_SHARED_MEMORY=true" in exc.violations[0].description


class SilentServer:
    """A TCP port that accepts connections and never answers: a server that hangs, then dies, mid-request."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)

    def die(self) -> None:
        for conn in [self.listener, *self.connections]:
            conn.close()


def wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_client_unlinks_when_the_server_dies_mid_request() -> None:
    server = SilentServer()
    errors: list[BaseException] = []
    left_after_the_error: list[list[str]] = []

    def call() -> None:
        with Client(server.address, shared_memory=True, timeout=30, attempts=1) as client:
            try:
                client.evaluate(batch(rows=256), "cross_entropy")
            except LossdError as exc:
                errors.append(exc)
                left_after_the_error.append(segments_of(os.getpid()))  # the failed call's segment, not pooled

    worker = threading.Thread(target=call)
    worker.start()
    wait_for(lambda: segments_of(os.getpid()) != [])  # the request is in flight, its segment exists
    server.die()
    worker.join(30)
    assert errors and not worker.is_alive()
    assert left_after_the_error == [[]]
    assert segments_of(os.getpid()) == []


CLIENT = """
import sys
import numpy as np
from lossd.client import Client
logits = np.zeros((256, 1000), np.float32)
with Client(sys.argv[1], shared_memory=True, timeout=120) as client:
    client.evaluate({"logits": logits, "labels": np.zeros(256, np.int64)}, "cross_entropy")
"""


def test_a_client_killed_mid_request_leaves_nothing_after_the_next_start() -> None:
    server = SilentServer()
    child = subprocess.Popen([sys.executable, "-c", CLIENT, server.address])
    try:
        wait_for(lambda: segments_of(child.pid) != [])
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        server.die()
    # kill -9 runs no cleanup; the next shared-memory client of this user sweeps the dead pid's segments
    with Client("127.0.0.1:1", shared_memory=True):
        pass
    assert segments_of(child.pid) == []
