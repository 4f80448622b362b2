"""The synchronous lossd client.

    from lossd.client import Client

    with Client("localhost:50051") as client:
        out = client.evaluate({"logits": logits, "labels": labels}, ["cross_entropy", "ece:n_bins=15"])
        out["cross_entropy"].value

Tensors are numpy arrays, torch tensors (bfloat16 included) or nested lists.
Every call has a deadline (``timeout``, default 60 s); calls answered
UNAVAILABLE are retried by gRPC itself (the channel's service config); every
other failure raises a :mod:`lossd.client.errors` exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from lossd.client.channel import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, EVALUATE_METHOD, channel_options
from lossd.client.errors import from_rpc_error
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import (
    DEFAULT_CHUNK_BYTES,
    Functions,
    StatesLike,
    TagsLike,
    arrays_of,
    batch_bytes,
    batch_requests,
    finalize_request,
    function_specs,
    new_request_id,
    serialized_evaluate,
    split_rows,
    splittable_names,
    tags_proto,
    wants_per_element,
)
from lossd.client.run import Run
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["Client"]

T = TypeVar("T")


def check_timeout(timeout: float | None, default: float) -> float:
    """Return the deadline of a call in seconds: ``timeout``, or the client's default when None."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"expected timeout > 0 seconds, got {timeout!r}")
    return float(timeout)


def check_chunk_bytes(chunk_bytes: int | None) -> int | None:
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
        raise ValueError(f"expected chunk_bytes to be a positive integer or None (never split), got {chunk_bytes!r}")
    return chunk_bytes


class _GuardedRequests:
    """A request iterator that, when the caller's iterable raises, cancels the call and keeps the error.

    gRPC would otherwise log the exception and end the call with UNKNOWN; a
    cancelled call never lets the server finalize a partial stream.
    """

    def __init__(self, messages: Iterator[pb.EvaluateRequest]) -> None:
        self.messages = messages
        self.error: BaseException | None = None
        self._call: grpc.Future | None = None
        self._attached = threading.Event()

    def attach(self, call: grpc.Future) -> None:
        self._call = call
        self._attached.set()

    def __iter__(self) -> Iterator[pb.EvaluateRequest]:
        try:
            yield from self.messages
        except Exception as exc:
            self.error = exc
            self._attached.wait()
            assert self._call is not None
            self._call.cancel()


class Client:
    """A connection to a lossd server (``host:port``); close it, or use it as a context manager.

    ``timeout``: default deadline of every call, in seconds. ``attempts``: tries
    per call answered UNAVAILABLE (1 disables retries). ``chunk_bytes``: in
    streams, batches larger than this go in parts when every function is
    splittable (None: never split). ``options``: extra gRPC channel options,
    overriding the defaults by name. ``credentials``: a secure channel.
    """

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
        self._channel = grpc.secure_channel(address, credentials, opts) if credentials is not None else grpc.insecure_channel(address, opts)
        self._stub = pb_grpc.LossServiceStub(self._channel)
        # Evaluate with requests already serialized (lossd.client.wire: no protobuf copies of tensors).
        self._evaluate_bytes = self._channel.unary_unary(
            EVALUATE_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString
        )
        self._splittable: dict[str, bool] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(request, timeout=check_timeout(timeout, self.timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def evaluate(
        self,
        tensors: Mapping[str, Any],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult:
        """Evaluate ``functions`` (specs: ``"cross_entropy"``, ``"ece:n_bins=15"``, mappings) on one batch.

        A batch over ``chunk_bytes`` whose functions are all splittable goes
        through EvaluateStream in parts (same values, exact merge), so that no
        single message has to fit the server's message-size limit.
        """
        arrays, specs = arrays_of(tensors), function_specs(functions)
        if self._should_chunk(specs, arrays):
            return self.evaluate_stream([arrays], specs, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id)
        request = serialized_evaluate(
            arrays, specs, tags=tags_proto(tags), return_state=return_state, request_id=request_id or new_request_id()
        )
        return self.evaluate_request(request, timeout=timeout)

    def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult:
        """Send a request built by hand (e.g. with ``prior_states``), as a message or already serialized."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        return EvaluationResult(self._call(self._evaluate_bytes, payload, timeout))

    def evaluate_stream(
        self,
        batches: Iterable[Mapping[str, Any]],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult:
        """Exact totals over many batches in one streaming call; batches are read and sent one at a time.

        ``timeout`` covers the whole stream.
        """
        call, guard = self._start_stream(batches, functions, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id)
        return self._stream_result(call, guard)

    def _start_stream(
        self,
        batches: Iterable[Mapping[str, Any]],
        functions: Functions,
        *,
        tags: TagsLike,
        return_state: bool,
        timeout: float | None,
        request_id: str | None,
    ) -> tuple[grpc.Future, _GuardedRequests]:
        """Start EvaluateStream; gRPC reads ``batches`` (encoding each in turn) on its own thread."""
        specs = function_specs(functions)
        tags_msg = tags_proto(tags)
        rid = request_id or new_request_id()
        deadline = check_timeout(timeout, self.timeout)

        def messages() -> Iterator[pb.EvaluateRequest]:
            for index, tensors in enumerate(batches):
                arrays = arrays_of(tensors)
                parts = split_rows(arrays, self.chunk_bytes) if self.chunk_bytes and self._may_split(specs, arrays) else [arrays]
                yield from batch_requests(index, parts, specs, tags=tags_msg, return_state=return_state, request_id=rid)

        guard = _GuardedRequests(messages())
        call = self._stub.EvaluateStream.future(iter(guard), timeout=deadline)
        guard.attach(call)
        return call, guard

    @staticmethod
    def _stream_result(call: grpc.Future, guard: _GuardedRequests) -> EvaluationResult:
        """Wait for a stream's response; the caller's own error first, if its batches raised one."""
        try:
            response = call.result()
        except grpc.FutureCancelledError:
            if guard.error is not None:
                raise guard.error from None
            raise
        except grpc.RpcError as exc:
            if guard.error is not None:
                raise guard.error from None
            raise from_rpc_error(exc) from exc
        return EvaluationResult(response)

    def _should_chunk(self, specs: Sequence[pb.FunctionSpec], arrays: Mapping[str, Any]) -> bool:
        """A unary evaluation that should go in parts: over chunk_bytes, splittable, no per-element output."""
        return bool(self.chunk_bytes) and not wants_per_element(specs) and self._may_split(specs, arrays)

    def _may_split(self, specs: Sequence[pb.FunctionSpec], arrays: Mapping[str, Any]) -> bool:
        """Whether a batch over the chunk size may go in parts: only when every function is splittable."""
        assert self.chunk_bytes is not None
        if batch_bytes(arrays) <= self.chunk_bytes:
            return False
        if self._splittable is None:
            self._splittable = splittable_names(self.list_functions())
        return all(self._splittable.get(s.name, False) for s in specs)

    def finalize(
        self,
        states: StatesLike,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> EvaluationResult:
        """Merge states (from ranks, shards, runs) and return the values of the merged states."""
        request = finalize_request(states, tags=tags_proto(tags), return_state=return_state, request_id=request_id or new_request_id())
        return EvaluationResult(self._call(self._stub.Finalize, request, timeout))

    def list_functions(self, family: str = "", *, timeout: float | None = None) -> pb.ListFunctionsResponse:
        """Return the server's catalogue: every function's roles, parameters, outputs and splittability."""
        response = self._call(self._stub.ListFunctions, pb.ListFunctionsRequest(family=family), timeout)
        if not family:
            self._splittable = splittable_names(response)
        return response

    def run(self, functions: Functions, *, tags: TagsLike = None, timeout: float | None = None) -> Run:
        """Accumulate exact totals over many ``run.update(tensors)`` calls; see :class:`Run`."""
        return Run(self, function_specs(functions), tags=tags_proto(tags), timeout=timeout)
