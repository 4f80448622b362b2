"""What the machine allows, measured in the same run: loopback TCP between two processes, and memcpy."""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import time

import numpy as np
from _common import median_seconds


def _sender(port: int, nbytes: int, repeats: int) -> None:
    payload = bytes(nbytes)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeats):
            s.recv(1)  # "go"
            s.sendall(payload)


def tcp_seconds(nbytes: int, repeats: int = 7) -> float:
    """Median time for another process to move ``nbytes`` to this one over loopback TCP (one ask, one reply)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        context = multiprocessing.get_context("spawn")
        child = context.Process(target=_sender, args=(listener.getsockname()[1], nbytes, repeats + 1))
        child.start()
        conn, _ = listener.accept()
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        times = []
        with conn:
            for _ in range(repeats + 1):
                start = time.perf_counter()
                conn.sendall(b"g")
                got = 0
                while got < nbytes:
                    got += conn.recv_into(view[got:], nbytes - got)
                times.append(time.perf_counter() - start)
        child.join(30)
    return statistics.median(times[1:])


def memcpy_seconds(nbytes: int, repeats: int = 7) -> float:
    """Median time of one copy of ``nbytes`` in memory."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    return median_seconds(lambda: np.copyto(dst, src), repeats=repeats)
