"""The gRPC servicer: decode, validate, call lossd.kernels, encode, and emit one event per evaluation.

What happens to the events (Prometheus counters, the dashboard's history) is
monitoring's business (:mod:`lossd.server.monitoring.events` defines the
contract); the servicer only hands them to its subscribers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import torch

from lossd.kernels import Accumulator, all_functions, evaluate, finalize_states
from lossd.kernels.errors import InvalidInput
from lossd.server.convert import (
    decode_request_tensors,
    evaluation_to_proto,
    list_functions_response,
    specs_from_request,
    state_from_proto,
)
from lossd.server.errors import rpc_errors
from lossd.server.monitoring.events import EvaluationEvent, Subscriber
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["LossService"]


class Stopwatch:
    """The Timing of one call: decoding (summed over a stream's messages), compute = the rest."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.decode_seconds = 0.0

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Count the time spent in the block as decoding."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.decode_seconds += time.perf_counter() - t0

    def timing(self) -> pb.Timing:
        """The Timing so far."""
        total = time.perf_counter() - self.start
        return pb.Timing(decode_seconds=self.decode_seconds, compute_seconds=total - self.decode_seconds, total_seconds=total)


class LossService(pb_grpc.LossServiceServicer):  # type: ignore[misc]  # generated base, untyped
    """Implements lossd.v1.LossService on top of :mod:`lossd.kernels`."""

    def __init__(
        self,
        device: torch.device,
        *,
        exact_state_limit: int,
        compute_threads: int = 2,
        subscribers: Sequence[Subscriber] = (),
    ) -> None:
        self.device = device
        self.exact_state_limit = exact_state_limit
        self.subscribers = list(subscribers)
        self._pool = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="lossd-compute")
        self._calls = itertools.count(1)

    async def _compute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Evaluations (and a stream's finalize) are CPU/GPU bound and release the GIL: keep them off the event loop.
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _publish(self, event: EvaluationEvent) -> None:
        for subscriber in self.subscribers:
            subscriber(event)  # returns at once: subscribers queue their work (the response is not delayed)

    @rpc_errors  # type: ignore[untyped-decorator]
    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        watch = Stopwatch()
        with watch.decoding():
            specs = specs_from_request(list(request.functions))
            tensors = decode_request_tensors(request.tensors, self.device)
            prior = {alias: state_from_proto(s, f"prior_states.{alias}") for alias, s in request.prior_states.items()}
        evaluation = await self._compute(
            evaluate,
            tensors,
            specs,
            device=self.device,
            return_state=request.return_state,
            prior_states=prior or None,
            exact_state_limit=self.exact_state_limit,
        )
        response = evaluation_to_proto(evaluation, request.request_id)
        response.timing.CopyFrom(watch.timing())
        self._publish(
            EvaluationEvent("Evaluate", next(self._calls), request.tags, evaluation, evaluation.batch, evaluation.prepared, prior)
        )
        return response

    @rpc_errors  # type: ignore[untyped-decorator]
    async def EvaluateStream(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        watch = Stopwatch()
        call = next(self._calls)
        acc: Accumulator | None = None
        first: pb.EvaluateRequest | None = None
        finished = False
        try:
            index = 0
            async for message in request_iterator:
                with watch.decoding():
                    if first is None:
                        acc = Accumulator(
                            specs_from_request(list(message.functions)), device=self.device, exact_state_limit=self.exact_state_limit
                        )
                        first = message
                    _check_stream_message(message, first, index)
                    tensors = decode_request_tensors(message.tensors, self.device)
                batch = await self._compute(acc.add, tensors, message.batch_id)  # type: ignore[union-attr]
                self._publish(EvaluationEvent("EvaluateStream", call, first.tags, None, batch, tuple(acc.prepared)))  # type: ignore[union-attr]
                index += 1
            if acc is None or first is None:
                raise InvalidInput.single("messages", "expected at least one message in the stream, got none")
            evaluation = await self._compute(acc.result, return_state=first.return_state)
            response = evaluation_to_proto(evaluation, first.request_id)
            response.timing.CopyFrom(watch.timing())
            self._publish(EvaluationEvent("EvaluateStream", call, first.tags, evaluation, None, tuple(acc.prepared)))
            finished = True
            return response
        finally:
            if first is not None and not finished:  # subscribers forget the messages of a failed stream
                self._publish(EvaluationEvent("EvaluateStream", call, first.tags, None, aborted=True))

    @rpc_errors  # type: ignore[untyped-decorator]
    async def Finalize(self, request: pb.FinalizeRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        watch = Stopwatch()
        with watch.decoding():
            states = [(s.alias, state_from_proto(s.state, f"states[{i}].state")) for i, s in enumerate(request.states)]
            for i, (alias, _) in enumerate(states):
                if not alias:
                    raise InvalidInput.single(f"states[{i}].alias", "expected the alias the state was computed under, got an empty string")
        evaluation = await self._compute(
            finalize_states, states, exact_state_limit=self.exact_state_limit, return_state=request.return_state
        )
        response = evaluation_to_proto(evaluation, request.request_id)
        response.timing.CopyFrom(watch.timing())
        self._publish(EvaluationEvent("Finalize", next(self._calls), request.tags, evaluation))
        return response

    @rpc_errors  # type: ignore[untyped-decorator]
    async def ListFunctions(self, request: pb.ListFunctionsRequest, context: grpc.aio.ServicerContext) -> pb.ListFunctionsResponse:
        functions = all_functions()
        if request.family:
            families = sorted({f.family for f in functions})
            if request.family not in families:
                raise InvalidInput.single("family", f"expected one of {', '.join(families)}, got {request.family!r}")
            functions = [f for f in functions if f.family == request.family]
        return list_functions_response(functions)

    def close(self) -> None:
        """Stop the compute threads (queued work is cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_stream_message(message: pb.EvaluateRequest, first: pb.EvaluateRequest, index: int) -> None:
    """Messages after the first repeat its functions or name none, and never carry prior_states."""
    if message is not first and message.functions and list(message.functions) != list(first.functions):
        raise InvalidInput.single(
            f"messages[{index}].functions", "expected the functions of the first message (or none), got different ones"
        )
    if message.prior_states:
        raise InvalidInput.single(
            f"messages[{index}].prior_states", "prior_states are not accepted in a stream; use Finalize to merge states"
        )
