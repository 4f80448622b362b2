"""The gateway's gRPC backends: round-robin over replicas, with health-aware failover.

Each call starts at the next replica in turn and skips replicas marked down;
a replica that answers UNAVAILABLE (refused connection, draining) is marked
down for ``cooldown`` seconds and the call moves on to the next one within
the same deadline. Every other status is the answer and goes back to the
client. When every replica is down, they are all tried anyway (a cooldown is
a guess, not a verdict). ``check()`` asks each replica's grpc.health.v1
service and refreshes the marks; /readyz uses it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.server.settings import GRPC_OPTIONS, Settings
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["Backend", "BackendPool", "NoBackendsError"]

T = TypeVar("T")

Call = Callable[[pb_grpc.LossServiceStub, float], Awaitable[T]]  # (stub, timeout seconds) -> response


class NoBackendsError(RuntimeError):
    """The pool was built without any backend address."""


@dataclass
class Backend:
    address: str
    down_until: float = 0.0  # monotonic time before which the replica is skipped
    failures: int = 0

    def is_up(self, now: float) -> bool:
        return now >= self.down_until


class BackendPool:
    """gRPC channels to lossd replicas; channels are made lazily on the running event loop."""

    def __init__(
        self, addresses: Sequence[str], settings: Settings, *, cooldown: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not addresses:
            raise NoBackendsError("expected at least one gRPC backend address, got none")
        self.backends = [Backend(a) for a in addresses]
        self.settings = settings
        self.cooldown = cooldown
        self._clock = clock
        self._turn = itertools.count()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._options = [
            *GRPC_OPTIONS,
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Fail fast on a dead replica instead of waiting out the reconnect backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]

    def channel(self, address: str) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # channels belong to the loop they were made on
            self._channels = {}
            self._loop = loop
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return channel

    def order(self) -> list[Backend]:
        """Replicas in the order this call tries them: round robin, replicas marked down last."""
        n = len(self.backends)
        start = next(self._turn) % n
        rotated = self.backends[start:] + self.backends[:start]
        now = self._clock()
        return [b for b in rotated if b.is_up(now)] + [b for b in rotated if not b.is_up(now)]

    def _mark(self, backend: Backend, up: bool) -> None:
        if up:
            backend.down_until, backend.failures = 0.0, 0
        else:
            backend.failures += 1
            backend.down_until = self._clock() + self.cooldown

    async def call(self, fn: Call[T]) -> T:
        """Run ``fn(stub, timeout)`` on one replica, failing over on UNAVAILABLE within one deadline."""
        deadline = self._clock() + self.settings.request_timeout_seconds
        error: grpc.aio.AioRpcError | None = None
        for backend in self.order():
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                result = await fn(pb_grpc.LossServiceStub(self.channel(backend.address)), remaining)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._mark(backend, up=False)
                error = exc
                continue
            self._mark(backend, up=True)
            return result
        if error is not None:
            raise error
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "deadline exceeded before any backend answered"
        )

    async def check(self, timeout: float = 2.0) -> dict[str, str]:
        """Each replica's grpc.health.v1 status (SERVING, NOT_SERVING, UNREACHABLE...); refreshes the marks."""

        async def one(backend: Backend) -> str:
            stub = health_pb2_grpc.HealthStub(self.channel(backend.address))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                self._mark(backend, up=False)
                return "UNREACHABLE" if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else exc.code().name
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            self._mark(backend, up=serving)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        statuses = await asyncio.gather(*(one(b) for b in self.backends))
        return {b.address: s for b, s in zip(self.backends, statuses, strict=True)}

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
