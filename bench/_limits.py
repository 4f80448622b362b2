"""What the machine allows, measured in the same run: loopback TCP between two processes, and memcpy."""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import time
from typing import Any

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


def _echo(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := s.recv(100):
            s.sendall(data)


def tcp_round_trip_seconds(repeats: int = 3000) -> float:
    """Median round trip of 100 bytes to another process and back over loopback TCP (no framework)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        child = multiprocessing.get_context("spawn").Process(target=_echo, args=(listener.getsockname()[1],))
        child.start()
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def round_trip() -> None:
            conn.sendall(b"x" * 100)
            got = 0
            while got < 100:
                got += len(conn.recv(100 - got))

        with conn:
            seconds = median_seconds(round_trip, repeats=repeats, warmup=100)
        child.join(30)
    return seconds


def _floor_server(ports: Any) -> None:  # ports: a multiprocessing SimpleQueue, for the bound port
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from lossd.client.buffers import reuse_large_buffers
    from lossd.client.channel import GRPC_OPTIONS

    reuse_large_buffers(1 << 30)  # as lossd serve does: received messages reuse freed buffers (lossd.client.buffers)

    async def sink(request: bytes, context: object) -> bytes:
        return b""

    async def serve() -> None:
        server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.max_receive_message_length", 1 << 30)])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        # Bytes in, bytes out: no protobuf on either side.
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SINK[0], {SINK[1]: grpc.unary_unary_rpc_method_handler(sink)}),)
        )
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


SINK = ("lossd.bench.Floor", "Sink")


def grpc_floor_seconds(nbytes: int, repeats: int = 2000, large_repeats: int = 15) -> tuple[float, float]:
    """Median unary calls of grpcio itself, with no lossd code on either side: (a health Check, ``nbytes`` sent as raw bytes).

    A blocking client and a grpc.aio server in another process, with lossd's
    HTTP/2 options and its malloc tuning (:mod:`lossd.client.buffers`, in the
    server process here, in this one by :func:`bench_serve.main`): the floors
    under the [64, 10] rows and the 16 MB rows."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lossd.client.channel import GRPC_OPTIONS

    context = multiprocessing.get_context("spawn")
    ports = context.SimpleQueue()
    child = context.Process(target=_floor_server, args=(ports,), daemon=True)
    child.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports.get()}", options=GRPC_OPTIONS) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest()
            check(request, timeout=30, wait_for_ready=True)
            small = median_seconds(lambda: check(request, timeout=30), repeats=repeats, warmup=100)
            sink = channel.unary_unary(f"/{SINK[0]}/{SINK[1]}")
            payload = bytes(nbytes)
            large = median_seconds(lambda: sink(payload, timeout=60), repeats=large_repeats, warmup=2)
    finally:
        child.kill()
        child.join(30)
    return small, large
