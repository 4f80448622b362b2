"""The synchronous lossd client.

    from lossd.client import Client

    with Client("localhost:50051") as client:
        out = client.evaluate({"logits": logits, "labels": labels}, ["cross_entropy", "ece:n_bins=15"])
        out["cross_entropy"].value

    Client("lossd.example:50051", ca_file="ca.pem", token_file="token")  # TLS and a bearer token

Tensors are numpy arrays, torch tensors (bfloat16 included) or nested lists.
Every call has a deadline (``timeout``, default 60 s); calls answered
UNAVAILABLE are retried by gRPC itself (the channel's service config), and
an overloaded server's RESOURCE_EXHAUSTED after its retry hint
(:mod:`lossd.client.retries`; a request over a budget or a size limit is
never retried); every other failure raises a :mod:`lossd.client.errors`
exception. Validation,
request building and the split decision live in :mod:`lossd.client.core`;
this module only calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from lossd.client.base import ClientBase
from lossd.client.channel import EVALUATE_METHOD, EVALUATE_STREAM_METHOD
from lossd.client.core import (
    check_chunk_bytes,
    check_timeout,
    finalize_request_of,
    list_request,
    payload_of,
    run_arguments,
    unary_payload,
)
from lossd.client.errors import InvalidArgumentError
from lossd.client.evaluation import EvaluationResult
from lossd.client.local import check_compute
from lossd.client.local_sends import flushed_at_close
from lossd.client.messages import Functions, StatesLike, TagsLike, nan_policy_value, new_request_id, with_nan_policy
from lossd.client.retries import call_retrying
from lossd.client.run import Run, local_stream
from lossd.client.shared_memory import SharedBatch, refusal_reason
from lossd.client.streams import RetryingStream
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["Client", "check_timeout", "check_chunk_bytes"]


class Client(ClientBase):
    """A connection to a lossd server (``host:port``); close it, or use it as a context manager.

    The arguments are those of :class:`lossd.client.base.ClientBase`.
    """

    def _open(self) -> None:
        core = self.core
        if core.credentials is None:
            self._channel = grpc.insecure_channel(core.address, core.options)
        else:
            self._channel = grpc.secure_channel(core.address, core.credentials, core.options)
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated code has no annotations
        # Evaluate with requests already serialized (lossd.client.wire: no protobuf copies of tensors).
        self._evaluate_bytes = self._channel.unary_unary(
            EVALUATE_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString
        )
        self._evaluate_stream_bytes = self._channel.stream_unary(
            EVALUATE_STREAM_METHOD, request_serializer=None, response_deserializer=pb.EvaluateResponse.FromString
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Send and wait for each compute="local" run's last Finalize, then close the channel (and unlink the client's shared-memory segments)."""
        for run in list(self.core.local_runs):
            flushed_at_close(run)
        self._channel.close()
        self.core.segments.close()

    def evaluate(
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
        """Evaluate ``functions`` (specs: ``"cross_entropy"``, ``"ece:n_bins=15"``, mappings) on one batch.

        ``nan_policy``: "propagate" (the server's default), "raise" or "omit"
        (see the README, "NaN and infinite values").
        A batch over ``chunk_bytes`` whose functions are all splittable goes
        through EvaluateStream in parts (same values, exact merge), so that no
        single message has to fit the server's message-size limit.
        """
        nan_policy_value(nan_policy)  # a bad name fails here, before anything is sent
        arrays, specs = self.core.prepare(tensors, functions)
        if self.core.uses_shared_memory(arrays):
            shared = _evaluate_shared(
                self, arrays, specs, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id, nan_policy=nan_policy
            )
            if shared is not None:
                return shared
        if self.core.needs_catalogue(specs, arrays):
            self.list_functions()
        if self.core.should_chunk(specs, arrays):
            return self.evaluate_stream(
                [arrays], specs, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id, nan_policy=nan_policy
            )
        payload = unary_payload(arrays, specs, tags=tags, return_state=return_state, request_id=request_id)
        return self.evaluate_request(with_nan_policy(payload, nan_policy), timeout=timeout)

    def evaluate_request(self, request: pb.EvaluateRequest | bytes, *, timeout: float | None = None) -> EvaluationResult:
        """Send a request built by hand (e.g. with ``prior_states``), as a message or already serialized."""
        payload, deadline = payload_of(request), self.core.deadline(timeout)
        response = call_retrying(lambda left: self._evaluate_bytes(payload, timeout=left), self.core.attempts, deadline)
        return EvaluationResult(response)

    def evaluate_stream(
        self,
        batches: Iterable[Mapping[str, Any]],
        functions: Functions,
        *,
        tags: TagsLike = None,
        return_state: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
        compute: str = "server",
        nan_policy: str | None = None,
    ) -> EvaluationResult:
        """Exact totals over many batches in one streaming call; batches are read and sent one at a time.

        ``timeout`` covers the whole stream. ``compute="local"``: each batch's
        states are computed here (:mod:`lossd.client.local`) and only states
        are sent, as a local run does (``timeout`` then applies to each call).
        ``nan_policy`` holds for every batch; the first_nonfinite_batch
        diagnostic names the first batch that brought NaN or inf.
        """
        if check_compute(compute) == "local":
            specs, tags_msg = run_arguments(functions, tags)
            rid = request_id or new_request_id()  # one id for the stream's calls and its batches, as a server stream has
            run = Run(self, specs, tags=tags_msg, timeout=timeout, compute="local", nan_policy=nan_policy, request_id=rid)
            return local_stream(run, batches, return_state=return_state)
        stream = open_stream(
            self, batches, functions, tags=tags, return_state=return_state, timeout=timeout, request_id=request_id, nan_policy=nan_policy
        )
        return stream.result()

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
        request = finalize_request_of(states, tags=tags, return_state=return_state, request_id=request_id)
        deadline = self.core.deadline(timeout)
        response = call_retrying(lambda left: self._stub.Finalize(request, timeout=left), self.core.attempts, deadline)
        return EvaluationResult(response)

    def list_functions(self, family: str = "", *, timeout: float | None = None) -> pb.ListFunctionsResponse:
        """Return the server's catalogue (``family``: only that family): roles, parameters, outputs, splittability."""
        request, deadline = list_request(family), self.core.deadline(timeout)
        response = call_retrying(lambda left: self._stub.ListFunctions(request, timeout=left), self.core.attempts, deadline)
        return self.core.learn(family, response)

    def run(
        self,
        functions: Functions,
        *,
        tags: TagsLike = None,
        timeout: float | None = None,
        compute: str = "server",
        nan_policy: str | None = None,
    ) -> Run:
        """Accumulate exact totals over many ``run.update(tensors)`` calls; see :class:`Run`."""
        specs, tags_msg = run_arguments(functions, tags)
        return Run(self, specs, tags=tags_msg, timeout=timeout, compute=compute, nan_policy=nan_policy)


def _evaluate_shared(
    client: Client,
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[pb.FunctionSpec],
    *,
    tags: TagsLike,
    return_state: bool,
    timeout: float | None,
    request_id: str | None,
    nan_policy: str | None = None,
) -> EvaluationResult | None:
    """One batch through a pooled shared-memory segment (unlinked if the call fails); None when the server refuses it."""
    with SharedBatch(arrays, client.core.segments) as segment:
        payload = segment.request(specs, tags=tags, return_state=return_state, request_id=request_id or new_request_id())
        payload = with_nan_policy(payload, nan_policy)
        try:
            return client.evaluate_request(payload, timeout=timeout)
        except InvalidArgumentError as exc:
            reason = refusal_reason(exc)
            if reason is None:
                raise
            client.core.shared_memory_refused(reason)
            return None


def open_stream(
    client: Client,
    batches: Iterable[Mapping[str, Any]],
    functions: Functions,
    *,
    tags: TagsLike,
    return_state: bool,
    timeout: float | None,
    request_id: str | None,
    nan_policy: str | None = None,
) -> RetryingStream:
    """EvaluateStream on ``client``, to start with ``.result()``; gRPC reads ``batches`` (encoding each in turn) on its own thread."""
    deadline = client.core.deadline(timeout)
    messages = client.core.stream_messages(
        batches,
        functions,
        tags=tags,
        return_state=return_state,
        request_id=request_id or new_request_id(),  # one id for every attempt
        catalogue=client.list_functions,
        nan_policy=nan_policy,
    )
    return RetryingStream(client._evaluate_stream_bytes, messages, attempts=client.core.attempts, timeout=deadline)
