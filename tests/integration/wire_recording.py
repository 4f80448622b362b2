"""Server interceptors for tests: the size of every request message as it arrives (bytes on the wire), and the methods called."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class RecordingInterceptor(grpc.aio.ServerInterceptor):
    """Records (method, serialized request bytes) for every request message the server parses."""

    def __init__(self) -> None:
        self.sizes: list[tuple[str, int]] = []

    def clear(self) -> None:
        self.sizes.clear()

    def of(self, method: str) -> list[int]:
        return [n for m, n in self.sizes if m == method]

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer

        def recording(data: bytes) -> Any:
            self.sizes.append((method, len(data)))
            return parse(data)

        return handler._replace(request_deserializer=recording)


class MethodRecorder(grpc.aio.ServerInterceptor):
    """Keeps the LossService methods the server is called with, in order."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith("/lossd.v1.LossService/"):
            self.methods.append(details.method.rsplit("/", 1)[-1])
        return await continuation(details)
