"""The asyncio lossd client: :class:`AsyncClient`, the twin of :class:`lossd.client.Client`.

    async with AsyncClient("localhost:50051") as client:
        out = await client.evaluate({"logits": logits, "labels": labels}, "cross_entropy")

Create it inside the running event loop (grpc.aio channels belong to one loop).
Validation, request building and the split decision are those of
:mod:`lossd.client.core`, shared with the blocking client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from lossd.client.base import ClientBase
from lossd.client.channel import EVALUATE_METHOD
from lossd.client.client import Client, open_stream
from lossd.client.core import finalize_request_of, list_request, payload_of, run_arguments, unary_payload
from lossd.client.errors import InvalidArgumentError
from lossd.client.evaluation import EvaluationResult
from lossd.client.local import check_compute
from lossd.client.local_sends import flushed_at_close_async
from lossd.client.messages import Functions, StatesLike, TagsLike, nan_policy_value, new_request_id, with_nan_policy
from lossd.client.retries import call_retrying_async
from lossd.client.run import AsyncRun, local_stream_async
from lossd.client.shared_memory import SharedBatch, refusal_reason
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


class AsyncClient(ClientBase):
    """An asyncio connection to a lossd server; the arguments are those of :class:`lossd.client.Client`."""

    def _open(self) -> None:
        core = self.core
        if core.credentials is None:
            self._channel = grpc.aio.insecure_channel(core.address, core.options)
        else:
            self._channel = grpc.aio.secure_channel(core.address, core.credentials, core.options)
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated code has no annotations
        self._evaluate_bytes = self._channel.unary_unary(
            EVALUATE_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString
        )
        self._blocking: Client | None = None  # streams run on it; see evaluate_stream

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Send and wait for each compute="local" run's last Finalize, then close the channel (and the blocking one streams use)."""
        for run in list(self.core.local_runs):
            await flushed_at_close_async(run)
        await self._channel.close()
        self.core.segments.close()
        if self._blocking is not None:
            self._blocking.close()

    async def evaluate(
        self,
        tensors: Mapping[str, Any],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
        nan_policy: str | None = None,
    ) -> EvaluationResult:
        """Evaluate ``functions`` on one batch; see :meth:`lossd.client.Client.evaluate` (large batches go in parts when allowed)."""
        nan_policy_value(nan_policy)  # a bad name fails here, before anything is sent
        arrays, specs = self.core.prepare(tensors, functions)
        if self.core.uses_shared_memory(arrays):
            with SharedBatch(arrays, self.core.segments) as segment:  # pooled again (unlinked if it failed) when the call ends
                payload = segment.request(specs, tags=tags, return_state=return_state, request_id=request_id or new_request_id())
                payload = with_nan_policy(payload, nan_policy)
                try:
                    return await self.evaluate_request(payload, timeout=timeout)
                except InvalidArgumentError as exc:
                    reason = refusal_reason(exc)
                    if reason is None:
                        raise
                    self.core.shared_memory_refused(reason)  # and this batch goes over the wire below
        if self.core.needs_catalogue(specs, arrays):
            await self.list_functions()
        if self.core.should_chunk(specs, arrays):
            return await self.evaluate_stream(
                [arrays], specs, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id, nan_policy=nan_policy
            )
        payload = unary_payload(arrays, specs, tags=tags, return_state=return_state, request_id=request_id)
        return await self.evaluate_request(with_nan_policy(payload, nan_policy), timeout=timeout)

    async def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult:
        """Send a request built by hand (e.g. with ``prior_states``), as a message or already serialized."""
        payload, deadline = payload_of(request), self.core.deadline(timeout)
        response = await call_retrying_async(lambda left: self._evaluate_bytes(payload, timeout=left), self.core.attempts, deadline)
        return EvaluationResult(response)

    async def evaluate_stream(
        self,
        batches: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
        compute: str = "server",
        nan_policy: str | None = None,
    ) -> EvaluationResult:
        """Exact totals over many batches (an iterable or async iterable) in one streaming call.

        ``compute="local"``: see :meth:`lossd.client.Client.evaluate_stream`.

        The stream runs on a blocking channel in a worker thread, which also
        keeps the encoding of large batches off the event loop. Why not
        grpc.aio: when the server ends a stream while a write is in flight
        (any error after the first message), grpc.aio reports INTERNAL
        instead of the server's status (grpc/grpc#36066), and a stream's
        INVALID_ARGUMENT with its field violations is part of this API.
        """
        if check_compute(compute) == "local":
            specs, tags_msg = run_arguments(functions, tags)
            rid = request_id or new_request_id()  # one id for the stream's calls and its batches, as a server stream has
            run = AsyncRun(self, specs, tags=tags_msg, timeout=timeout, compute="local", nan_policy=nan_policy, request_id=rid)
            return await local_stream_async(run, batches, return_state=return_state)
        loop = asyncio.get_running_loop()
        blocking = self._blocking_client()
        source = _blocking_iter(batches, loop) if isinstance(batches, AsyncIterable) else batches
        stream = open_stream(
            blocking, source, functions, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id, nan_policy=nan_policy
        )
        try:
            return await loop.run_in_executor(None, stream.result)
        except asyncio.CancelledError:
            stream.cancel()  # never let the server finalize a partial stream
            raise

    def _blocking_client(self) -> Client:
        if self._blocking is None:
            self._blocking = Client(**self.core.twin_arguments())
            self._blocking.core.share_catalogue(self.core)
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
        request = finalize_request_of(states, tags=tags, return_state=return_state, request_id=request_id)
        deadline = self.core.deadline(timeout)
        response = await call_retrying_async(lambda left: self._stub.Finalize(request, timeout=left), self.core.attempts, deadline)
        return EvaluationResult(response)

    async def list_functions(self, family: str = "", *, timeout: float | None = None) -> pb.ListFunctionsResponse:
        """Return the server's catalogue (``family``: only that family); see :meth:`lossd.client.Client.list_functions`."""
        request, deadline = list_request(family), self.core.deadline(timeout)
        response = await call_retrying_async(lambda left: self._stub.ListFunctions(request, timeout=left), self.core.attempts, deadline)
        return self.core.learn(family, response)

    def run(
        self,
        functions: Functions,
        *,
        tags: TagsLike = None,
        timeout: float | None = None,
        compute: str = "server",
        nan_policy: str | None = None,
    ) -> AsyncRun:
        """Accumulate exact totals over many ``await run.update(tensors)`` calls (``nan_policy``: see Client.evaluate)."""
        specs, tags_msg = run_arguments(functions, tags)
        return AsyncRun(self, specs, tags=tags_msg, timeout=timeout, compute=compute, nan_policy=nan_policy)
