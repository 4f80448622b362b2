"""The gRPC servicer: decode, validate, call lossd.kernels, encode, and emit one event per evaluation.

What happens to the events (Prometheus counters, the dashboard's history) is
monitoring's business (:mod:`lossd.server.monitoring.events` defines the
contract); the servicer only hands them to its subscribers.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

import grpc
import torch

from lossd.client.messages import batch_label, in_batch
from lossd.kernels import Accumulator, Evaluation, FunctionDef, State, all_functions, evaluate, finalize_states
from lossd.kernels.batch import Batch
from lossd.kernels.budget import Budget, Estimate, Estimated, estimates
from lossd.kernels.cancellation import check_cancelled
from lossd.kernels.errors import FieldViolation, InvalidInput
from lossd.kernels.evaluate import PreparedSpecs
from lossd.server.admission import Admission, AdmissionLimits, deadline_of
from lossd.server.convert import (
    decode_request_tensors,
    evaluation_to_proto,
    list_functions_response,
    state_from_proto,
)
from lossd.server.errors import rpc_errors
from lossd.server.monitoring.events import EvaluationEvent, Subscriber
from lossd.server.monitoring.tags import check_tags
from lossd.server.observability.tracing import span
from lossd.server.spec_cache import SpecCache
from lossd.server.stream_messages import check_stream_message, nan_policy_of, next_message
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["LossService", "declared_estimates", "small_work", "wire_bytes"]

T = TypeVar("T")

# A Finalize checks for cancellation every this many states it decodes (~50 ms of checks).
STATES_PER_CANCEL_CHECK = 256

# Bytes per element by wire dtype; an unknown dtype (refused when decoded) counts as the widest.
_ITEMSIZE = {pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT32: 4, pb.FLOAT64: 8, pb.INT64: 8, pb.INT32: 4, pb.UINT8: 1, pb.BOOL: 1}


def wire_bytes(tensors: Mapping[str, pb.Tensor]) -> int:
    """The bytes the tensors declare (shape × dtype, a negative dimension counting as 0), without touching their data.

    Reading ``data`` would copy it on the event loop; a declaration that
    does not match the data is refused when the tensors are decoded."""
    total = 0
    for t in tensors.values():  # a loop, not nested generators: this runs on the loop for every request
        nbytes = _ITEMSIZE.get(t.dtype, 8)
        for d in t.shape:
            nbytes *= d if d > 0 else 0
        total += nbytes
    return total


class _Phase:
    """A block whose seconds add to a Stopwatch's decoding or encoding.

    A class: a generator-based context manager cost more than the blocks it timed on a [64, 10] request."""

    __slots__ = ("_watch", "_decoding", "_span", "_t0")

    def __init__(self, watch: Stopwatch, decoding: bool) -> None:
        self._watch, self._decoding = watch, decoding

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()
        self._span = span("lossd.decode") if self._decoding else None
        if self._span is not None:
            self._span.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._span is not None:
                self._span.__exit__(*exc)  # type: ignore[arg-type]  # (type, value, traceback) as received
        finally:
            elapsed = time.perf_counter() - self._t0
            if self._decoding:
                self._watch.decode_seconds += elapsed
            else:
                self._watch.encode_seconds += elapsed


class Stopwatch:
    """The Timing of one call: decoding (summed over a stream's messages), compute = the rest."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.decode_seconds = 0.0
        self.queue_seconds = 0.0  # waiting for a compute thread
        self.compute_seconds = 0.0  # on the compute thread
        self.encode_seconds = 0.0

    def decoding(self) -> AbstractContextManager[None]:
        """Count the time spent in the block as decoding (a ``lossd.decode`` span when tracing is on)."""
        return _Phase(self, decoding=True)

    def encoding(self) -> AbstractContextManager[None]:
        """Count the time spent in the block as encoding the response."""
        return _Phase(self, decoding=False)

    def timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn`` timed: the wait before it starts is queue time; its own decoding and encoding are not compute."""
        submitted = time.perf_counter()

        def timed() -> T:
            started = time.perf_counter()
            self.queue_seconds += started - submitted
            coding = self.decode_seconds + self.encode_seconds
            try:
                return fn()
            finally:
                self.compute_seconds += time.perf_counter() - started - (self.decode_seconds + self.encode_seconds - coding)

        return timed

    def phases(self) -> dict[str, float]:
        """Seconds per phase, for monitoring's phase histograms."""
        return {"queue": self.queue_seconds, "decode": self.decode_seconds, "compute": self.compute_seconds, "encode": self.encode_seconds}

    def timing(self) -> pb.Timing:
        """The Timing so far."""
        total = time.perf_counter() - self.start
        return pb.Timing(decode_seconds=self.decode_seconds, compute_seconds=total - self.decode_seconds, total_seconds=total)


class LossService(pb_grpc.LossServiceServicer):  # generated base (lossd.v1, untyped)
    """Implements lossd.v1.LossService on top of :mod:`lossd.kernels`."""

    def __init__(
        self,
        device: torch.device,
        *,
        exact_state_limit: int,
        admission: Admission | None = None,
        budget: Budget | None = None,
        compute_threads: int = 2,
        subscribers: Sequence[Subscriber] = (),
        allow_shared_memory: bool = False,
        stream_idle_seconds: float = 300.0,
    ) -> None:
        if not stream_idle_seconds > 0:
            raise ValueError(f"stream_idle_seconds: expected a positive number of seconds, got {stream_idle_seconds!r}")
        self.device = device
        self.allow_shared_memory = allow_shared_memory  # Evaluate's tensors may lie in a client's segment
        self.exact_state_limit = exact_state_limit
        self.stream_idle_seconds = stream_idle_seconds  # the longest wait for a stream's next message (or its end)
        self.budget = budget  # estimated memory and response bytes per request, checked before computing
        self.subscribers = list(subscribers)
        self.admission = admission if admission is not None else Admission(AdmissionLimits(compute_threads=compute_threads))
        self.specs = SpecCache()  # the validated functions of recent requests (Evaluate, a stream's first message)
        self._calls = itertools.count(1)

    async def _compute(
        self, fn: Callable[[], T], *, nbytes: int, watch: Stopwatch, context: grpc.aio.ServicerContext, inline: bool = False
    ) -> T:
        # Decoding, evaluating and encoding run on a compute lane, not on the event loop: health
        # checks, other calls and SIGTERM are answered whatever the load. Only an ``inline`` call
        # under the admission's inline bounds runs on the loop (its work is shorter than the hop).
        deadline = deadline_of(context.time_remaining())
        return await self.admission.run(watch.timed(fn), nbytes=nbytes, deadline=deadline, inline=inline)

    def _publish(self, event: EvaluationEvent) -> None:
        for subscriber in self.subscribers:
            subscriber(event)  # returns at once: subscribers queue their work (the response is not delayed)

    @rpc_errors
    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        watch = Stopwatch()
        async with self.admission.call():
            nbytes = wire_bytes(request.tensors) + sum(wire_bytes(s.fields) for s in request.prior_states.values())
            small = nbytes < self.admission.limits.inline_request_bytes
            # Validated here when small (running inline depends on them), else on the compute thread.
            prepared = self.specs.prepared(request.functions) if small else None
            inline, budget = _plan(request, prepared, small, self.admission.limits.inline_memory_bytes, self.budget)

            def run() -> tuple[Evaluation, dict[str, State], pb.EvaluateResponse]:
                with watch.decoding():
                    check_tags(request.tags)
                    specs = self.specs.specs(request.functions, prepared)
                    tensors = decode_request_tensors(request.tensors, self.device, allow_shared_memory=self.allow_shared_memory)
                    prior = {alias: state_from_proto(s, f"prior_states.{alias}") for alias, s in request.prior_states.items()}
                evaluation = evaluate(
                    tensors,
                    specs,
                    device=self.device,
                    return_state=request.return_state,
                    prior_states=prior or None,
                    exact_state_limit=self.exact_state_limit,
                    budget=budget,
                    nan_policy=nan_policy_of(request),
                )
                with watch.encoding():
                    return evaluation, prior, evaluation_to_proto(evaluation, request.request_id)

            evaluation, prior, response = await self._compute(run, nbytes=nbytes, watch=watch, context=context, inline=inline)
        response.timing.CopyFrom(watch.timing())
        batch, specs = evaluation.batch, evaluation.prepared
        self._publish(EvaluationEvent("Evaluate", next(self._calls), request.tags, evaluation, batch, specs, prior, phases=watch.phases()))
        return response

    @rpc_errors
    async def EvaluateStream(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        async with self.admission.call():  # one slot for the stream's whole life
            return await self._stream(request_iterator, context)

    async def _stream(self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        watch = Stopwatch()
        call = next(self._calls)
        acc: Accumulator | None = None
        first: pb.EvaluateRequest | None = None
        finished = False
        try:
            index = 0
            batch, last_batch_id = -1, ""  # the batch a message belongs to: parts of one share its batch_id
            messages = aiter(request_iterator)
            # Only the wait for the client counts: computing a message is not idle time.
            while (message := await next_message(messages, self.stream_idle_seconds)) is not None:
                if acc is None:
                    with watch.decoding():
                        check_tags(message.tags)
                        acc = Accumulator(
                            self.specs.specs(message.functions),
                            device=self.device,
                            exact_state_limit=self.exact_state_limit,
                            budget=self.budget,
                            nan_policy=nan_policy_of(message),
                        )
                first = first if first is not None else message
                batch += 0 if message.batch_id and message.batch_id == last_batch_id else 1
                last_batch_id = message.batch_id
                label = batch_label(batch, message.batch_id, first.request_id)
                add = functools.partial(_add_stream_message, acc, message, first, index, label, watch, self.device)
                added = await self._compute(add, nbytes=wire_bytes(message.tensors), watch=watch, context=context)
                self._publish(EvaluationEvent("EvaluateStream", call, first.tags, None, added, acc.prepared))
                index += 1
            if acc is None or first is None:
                raise InvalidInput.single("messages", "expected at least one message in the stream, got none")
            result = functools.partial(_stream_result, acc, first.request_id, first.return_state, watch)
            evaluation, response = await self._compute(result, nbytes=0, watch=watch, context=context)
            response.timing.CopyFrom(watch.timing())
            self._publish(EvaluationEvent("EvaluateStream", call, first.tags, evaluation, None, acc.prepared, phases=watch.phases()))
            finished = True
            return response
        finally:
            if first is not None and not finished:  # subscribers forget the messages of a failed stream
                self._publish(EvaluationEvent("EvaluateStream", call, first.tags, None, aborted=True))

    @rpc_errors
    async def Finalize(self, request: pb.FinalizeRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        watch = Stopwatch()
        async with self.admission.call():

            def run() -> tuple[Evaluation, pb.EvaluateResponse]:
                with watch.decoding():
                    check_tags(request.tags)
                    states = _named_states(request)
                evaluation = finalize_states(states, exact_state_limit=self.exact_state_limit, return_state=request.return_state)
                with watch.encoding():
                    return evaluation, evaluation_to_proto(evaluation, request.request_id)

            nbytes = sum(wire_bytes(s.state.fields) for s in request.states)
            evaluation, response = await self._compute(run, nbytes=nbytes, watch=watch, context=context)
        response.timing.CopyFrom(watch.timing())
        self._publish(EvaluationEvent("Finalize", next(self._calls), request.tags, evaluation, phases=watch.phases()))
        return response

    @rpc_errors
    async def ListFunctions(self, request: pb.ListFunctionsRequest, context: grpc.aio.ServicerContext) -> pb.ListFunctionsResponse:
        return list_functions_response(_functions_of_family(request.family))

    def close(self) -> None:
        """Stop the compute threads (queued work is cancelled; running work is not waited for)."""
        self.admission.close()


def _add_stream_message(
    acc: Accumulator,
    message: pb.EvaluateRequest,
    first: pb.EvaluateRequest,
    index: int,
    label: str,
    watch: Stopwatch,
    device: torch.device,
) -> Batch:
    """One stream message checked, decoded and added to the stream's accumulator (on a compute thread).

    Its bad tensors are refused naming the batch (``label``): in a stream of
    thousands, "tensors.logits holds NaN at row 3" alone does not say where."""
    with watch.decoding():
        check_stream_message(message, first, index)
    try:
        with watch.decoding():
            tensors = decode_request_tensors(message.tensors, device)
        return acc.add(tensors, message.batch_id, request_id=first.request_id)
    except InvalidInput as exc:
        raise naming_batch(exc, label) from None


def _stream_result(acc: Accumulator, request_id: str, return_state: bool, watch: Stopwatch) -> tuple[Evaluation, pb.EvaluateResponse]:
    """A stream's result once its last message is in (on a compute thread: finalizing can be heavy)."""
    evaluation = acc.result(return_state=return_state)
    with watch.encoding():
        return evaluation, evaluation_to_proto(evaluation, request_id)


def naming_batch(exc: InvalidInput, label: str) -> InvalidInput:
    """``exc`` with each violation saying which batch of the stream brought it (the client's runs say it the same way)."""
    named = InvalidInput([FieldViolation(v.field, in_batch(v.description, label)) for v in exc.violations])
    named.diagnostics = exc.diagnostics
    return named


def _negative_dim(request: pb.EvaluateRequest) -> bool:
    return any(d < 0 for t in request.tensors.values() for d in t.shape)


def declared_estimates(request: pb.EvaluateRequest, prepared: PreparedSpecs | None) -> list[tuple[str, Estimate]] | None:
    """The estimates of the request's functions (``prepared``) on its tensors' declared shapes (None: none made).

    None when the functions did not validate (or were not validated here) or a
    dimension is negative (refused when decoded; it must not shrink an estimate)."""
    if prepared is None or _negative_dim(request):
        return None
    return estimates(prepared, request.tensors)


def _plan(
    request: pb.EvaluateRequest, prepared: PreparedSpecs | None, small: bool, max_memory_bytes: int, budget: Budget | None
) -> tuple[bool, Budget | Estimated | None]:
    """(whether a request of ``small`` bytes runs on the event loop, the budget its evaluation checks).

    Its functions are estimated once, on the declared shapes: the decoded
    tensors have those shapes, so the evaluation checks these estimates
    instead of making them again."""
    known = declared_estimates(request, prepared)
    inline = small and small_work(request, prepared, max_memory_bytes, known)
    return inline, (Estimated(budget, known) if known is not None and budget is not None else budget)


def small_work(
    request: pb.EvaluateRequest, prepared: PreparedSpecs | None, max_memory_bytes: int, known: list[tuple[str, Estimate]] | None = None
) -> bool:
    """Whether the request's functions (``prepared``) declare at most ``max_memory_bytes`` of work on its declared shapes.

    A request of a few KiB can still ask for a large computation (bins × classes,
    N × N pairs); only work whose memory estimate is small runs on the event loop,
    where its time is bounded by the memory it touches. Functions that do not
    validate (``prepared`` None) are refused at once, wherever that happens.
    ``known``: :func:`declared_estimates` of the request, when already made."""
    if known is None:  # (made, they say that no dim is negative and the functions validated)
        if _negative_dim(request):
            return False  # refused when decoded; a negative dim must not shrink the estimate
        if prepared is None:
            return True
        known = estimates(prepared, request.tensors)
    return sum(e.memory for _, e in known) <= max_memory_bytes


def _functions_of_family(family: str) -> list[FunctionDef]:
    """The catalogue, or the functions of one ``family`` (an unknown one is INVALID_ARGUMENT naming the families)."""
    functions = all_functions()
    if family:
        families = sorted({f.family for f in functions})
        if family not in families:
            raise InvalidInput.single("family", f"expected one of {', '.join(families)}, got {family!r}")
        functions = [f for f in functions if f.family == family]
    return functions


def _named_states(request: pb.FinalizeRequest) -> list[tuple[str, State]]:
    """The (alias, State) pairs of a Finalize request, every alias non-empty.

    Checking a state costs ~0.2 ms: a message of 40,000 small ones took 9 s to
    decode, so the loop stops when the call is cancelled or past its deadline."""
    states = []
    for i, s in enumerate(request.states):
        if i % STATES_PER_CANCEL_CHECK == 0:
            check_cancelled()
        if not s.alias:
            raise InvalidInput.single(f"states[{i}].alias", "expected the alias the state was computed under, got an empty string")
        states.append((s.alias, state_from_proto(s.state, f"states[{i}].state")))
    return states
