"""The gRPC servicer: decode, call lossd.kernels, encode. Nothing else lives here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from lossd.kernels import Accumulator, Evaluation, FunctionSpec, State, all_functions, evaluate, finalize_states
from lossd.kernels.errors import InvalidInput
from lossd.server.convert import (
    decode_request_tensors,
    evaluation_to_proto,
    list_functions_response,
    specs_from_request,
    state_from_proto,
)
from lossd.server.errors import rpc_errors
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["LossService", "EvaluationObserver", "Observation"]


@dataclass(frozen=True)
class Observation:
    """What monitoring sees of one finished evaluation."""

    method: str  # Evaluate | EvaluateStream | Finalize
    tags: pb.Tags
    evaluation: Evaluation
    tensors: dict[str, torch.Tensor] | None  # Evaluate's batch, for per-row counts (None for streams and Finalize)
    # The request's functions (empty for Finalize), for observers that need their parameters.
    specs: tuple[FunctionSpec, ...] = ()
    # Evaluate's prior_states (alias -> State): the evaluation includes them, so monitoring
    # subtracts them to count this batch's contribution only.
    prior_states: Mapping[str, State] = field(default_factory=dict)
    # A stream's per-row sums over all its batches (what the batch summarizer returned, added up).
    row_summary: Any = None


EvaluationObserver = Callable[[Observation], None]
# Per-row sums of one stream batch; results must support ``+`` (they are added up over the stream).
BatchSummarizer = Callable[[Mapping[str, torch.Tensor]], Any]


class LossService(pb_grpc.LossServiceServicer):
    """Implements lossd.v1.LossService on top of :mod:`lossd.kernels`."""

    def __init__(
        self,
        device: torch.device,
        *,
        exact_state_limit: int,
        compute_threads: int = 2,
        observers: list[EvaluationObserver] | None = None,
        batch_summarizer: BatchSummarizer | None = None,
    ) -> None:
        self.device = device
        self.exact_state_limit = exact_state_limit
        self.observers = list(observers or [])
        self.batch_summarizer = batch_summarizer
        self._pool = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="lossd-compute")

    async def _compute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Evaluations are CPU/GPU bound and release the GIL: keep them off the event loop.
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _observe(self, obs: Observation) -> None:
        for observer in self.observers:
            observer(obs)

    async def _notify(self, obs: Observation) -> None:
        # Observers (monitoring's calibration pass over the logits) run on the compute
        # threads too: a 16 MB batch costs them ~16 ms that must not stall the event loop.
        if self.observers:
            await self._compute(self._observe, obs)

    @rpc_errors
    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        start = time.perf_counter()
        specs = specs_from_request(list(request.functions))
        tensors = decode_request_tensors(request.tensors, self.device)
        prior = {alias: state_from_proto(s, f"prior_states.{alias}") for alias, s in request.prior_states.items()}
        decoded = time.perf_counter()
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
        await self._notify(Observation("Evaluate", request.tags, evaluation, tensors, tuple(specs), prior))
        end = time.perf_counter()
        response.timing.CopyFrom(pb.Timing(decode_seconds=decoded - start, compute_seconds=end - decoded, total_seconds=end - start))
        return response

    @rpc_errors
    async def EvaluateStream(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        start = time.perf_counter()
        acc: Accumulator | None = None
        first: pb.EvaluateRequest | None = None
        specs: list[FunctionSpec] = []
        decode_seconds = 0.0
        tensors: dict[str, torch.Tensor] = {}
        summary: Any = None
        index = 0
        async for message in request_iterator:
            t0 = time.perf_counter()
            if first is None:
                first = message
                specs = specs_from_request(list(message.functions))
                acc = Accumulator(specs, device=self.device, exact_state_limit=self.exact_state_limit)
            elif message.functions and list(message.functions) != list(first.functions):
                raise InvalidInput.single(
                    f"messages[{index}].functions", "expected the functions of the first message (or none), got different ones"
                )
            if message.prior_states:
                raise InvalidInput.single(
                    f"messages[{index}].prior_states", "prior_states are not accepted in a stream; use Finalize to merge states"
                )
            tensors = decode_request_tensors(message.tensors, self.device)
            decode_seconds += time.perf_counter() - t0
            await self._compute(acc.add, tensors, message.batch_id)  # type: ignore[union-attr]
            if self.batch_summarizer is not None:  # monitoring's per-row sums, batch by batch (memory stays flat)
                part = await self._compute(self.batch_summarizer, tensors)
                summary = part if summary is None else summary + part
            index += 1
        if acc is None or first is None:
            raise InvalidInput.single("messages", "expected at least one message in the stream, got none")
        evaluation = acc.result(return_state=first.return_state)
        response = evaluation_to_proto(evaluation, first.request_id)
        await self._notify(Observation("EvaluateStream", first.tags, evaluation, None, tuple(specs), row_summary=summary))
        end = time.perf_counter()
        response.timing.CopyFrom(
            pb.Timing(decode_seconds=decode_seconds, compute_seconds=end - start - decode_seconds, total_seconds=end - start)
        )
        return response

    @rpc_errors
    async def Finalize(self, request: pb.FinalizeRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        start = time.perf_counter()
        states = [(s.alias, state_from_proto(s.state, f"states[{i}].state")) for i, s in enumerate(request.states)]
        for i, (alias, _) in enumerate(states):
            if not alias:
                raise InvalidInput.single(f"states[{i}].alias", "expected the alias the state was computed under, got an empty string")
        evaluation = await self._compute(
            finalize_states, states, exact_state_limit=self.exact_state_limit, return_state=request.return_state
        )
        response = evaluation_to_proto(evaluation, request.request_id)
        await self._notify(Observation("Finalize", request.tags, evaluation, None))
        end = time.perf_counter()
        response.timing.CopyFrom(pb.Timing(compute_seconds=end - start, total_seconds=end - start))
        return response

    @rpc_errors
    async def ListFunctions(self, request: pb.ListFunctionsRequest, context: grpc.aio.ServicerContext) -> pb.ListFunctionsResponse:
        functions = all_functions()
        if request.family:
            families = sorted({f.family for f in functions})
            if request.family not in families:
                raise InvalidInput.single("family", f"expected one of {', '.join(families)}, got {request.family!r}")
            functions = [f for f in functions if f.family == request.family]
        return list_functions_response(functions)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
