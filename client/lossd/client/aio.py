"""The asyncio lossd client: :class:`AsyncClient`, the twin of :class:`lossd.client.Client`.

    async with AsyncClient("localhost:50051") as client:
        out = await client.evaluate({"logits": logits, "labels": labels}, "cross_entropy")

Create it inside the running event loop (grpc.aio channels belong to one loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from lossd.client.channel import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, EVALUATE_METHOD, channel_options
from lossd.client.client import Client, check_chunk_bytes, check_timeout
from lossd.client.errors import from_rpc_error
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import (
    DEFAULT_CHUNK_BYTES,
    Functions,
    StatesLike,
    TagsLike,
    arrays_of,
    batch_bytes,
    finalize_request,
    function_specs,
    new_request_id,
    serialized_evaluate,
    tags_proto,
    wants_per_element,
)
from lossd.client.run import AsyncRun
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["AsyncClient"]

T = TypeVar("T")


def _blocking_iter(batches: AsyncIterable[T], loop: asyncio.AbstractEventLoop) -> Iterator[T]:
    """Read an async iterable from another thread: each step runs on ``loop``."""
    iterator = batches.__aiter__()

    async def step() -> T:
        return await iterator.__anext__()

    while True:
        try:
            item = asyncio.run_coroutine_threadsafe(step(), loop).result()
        except StopAsyncIteration:
            return
        yield item


class AsyncClient:
    """An asyncio connection to a lossd server; the arguments are those of :class:`lossd.client.Client`."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not isinstance(address, str) or not address:
            raise ValueError(f"expected a server address host:port, got {address!r}")
        self.address = address
        self.timeout = check_timeout(timeout, DEFAULT_TIMEOUT)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        opts = channel_options(attempts=attempts, extra=options)
        self._channel = (
            grpc.aio.secure_channel(address, credentials, opts) if credentials is not None else grpc.aio.insecure_channel(address, opts)
        )
        self._stub = pb_grpc.LossServiceStub(self._channel)
        self._evaluate_bytes = self._channel.unary_unary(
            EVALUATE_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString
        )
        self._config: dict[str, Any] = dict(
            timeout=timeout, attempts=attempts, chunk_bytes=chunk_bytes, options=options, credentials=credentials
        )
        self._blocking: Client | None = None  # streams run on it; see evaluate_stream

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        if self._blocking is not None:
            self._blocking.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        try:
            return await method(request, timeout=check_timeout(timeout, self.timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def evaluate(
        self,
        tensors: Mapping[str, Any],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult:
        """Evaluate ``functions`` on one batch; see :meth:`lossd.client.Client.evaluate` (large batches go in parts)."""
        arrays, specs = arrays_of(tensors), function_specs(functions)
        if self.chunk_bytes and batch_bytes(arrays) > self.chunk_bytes and not wants_per_element(specs):
            return await self.evaluate_stream([arrays], specs, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id)
        request = serialized_evaluate(
            arrays, specs, tags=tags_proto(tags), return_state=return_state, request_id=request_id or new_request_id()
        )
        return await self.evaluate_request(request, timeout=timeout)

    async def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult:
        """Send a request built by hand (e.g. with ``prior_states``), as a message or already serialized."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        return EvaluationResult(await self._call(self._evaluate_bytes, payload, timeout))

    async def evaluate_stream(
        self,
        batches: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult:
        """Exact totals over many batches (an iterable or async iterable) in one streaming call.

        The stream runs on a blocking channel in a worker thread, which also
        keeps the encoding of large batches off the event loop. Why not
        grpc.aio: when the server ends a stream while a write is in flight
        (any error after the first message), grpc.aio reports INTERNAL
        instead of the server's status (grpc/grpc#36066), and a stream's
        INVALID_ARGUMENT with its field violations is part of this API.
        """
        loop = asyncio.get_running_loop()
        blocking = self._blocking_client()
        source = _blocking_iter(batches, loop) if isinstance(batches, AsyncIterable) else batches
        call, guard = blocking._start_stream(
            source, functions, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id
        )
        try:
            return await loop.run_in_executor(None, blocking._stream_result, call, guard)
        except asyncio.CancelledError:
            call.cancel()  # never let the server finalize a partial stream
            raise

    def _blocking_client(self) -> Client:
        if self._blocking is None:
            self._blocking = Client(self.address, **self._config)
        return self._blocking

    async def finalize(
        self,
        states: StatesLike,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult:
        """Merge states and return the values of the merged states; see :meth:`lossd.client.Client.finalize`."""
        request = finalize_request(states, tags=tags_proto(tags), return_state=return_state, request_id=request_id or new_request_id())
        return EvaluationResult(await self._call(self._stub.Finalize, request, timeout))

    async def list_functions(self, family: str = "", *, timeout: float | None = None) -> pb.ListFunctionsResponse:
        """Return the server's catalogue; see :meth:`lossd.client.Client.list_functions`."""
        return await self._call(self._stub.ListFunctions, pb.ListFunctionsRequest(family=family), timeout)

    def run(self, functions: Functions, *, tags: TagsLike = None, timeout: float | None = None) -> AsyncRun:
        """Accumulate exact totals over many ``await run.update(tensors)`` calls."""
        return AsyncRun(self, function_specs(functions), tags=tags_proto(tags), timeout=timeout)
