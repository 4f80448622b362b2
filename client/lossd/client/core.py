"""The one client core behind :class:`~lossd.client.Client` and :class:`~lossd.client.AsyncClient`.

Everything that does not wait on the network lives here, once: argument
validation, the channel's options and credentials, request building, the
decision to split a large batch into parts (only when every function is
splittable with its parameters, learnt from ListFunctions and cached), and
the mapping of ``grpc.RpcError`` to :mod:`lossd.client.errors`. The two
clients only call, or await, their transport with what this core builds.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np

from lossd.client.channel import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, channel_options
from lossd.client.errors import from_rpc_error
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
    nan_policy_value,
    new_request_id,
    serialized_evaluate,
    split_rows,
    splittable_names,
    tags_proto,
    wants_per_element,
)
from lossd.client.settings import ClientSettings
from lossd.client.shared_memory import SegmentPool, local_or_reason, sweep_stale_segments, worth_sharing
from lossd.v1 import lossd_pb2 as pb

log = logging.getLogger("lossd.client")

__all__ = [
    "ClientCore",
    "check_timeout",
    "check_chunk_bytes",
    "channel_credentials",
    "lossd_errors",
    "unary_payload",
    "payload_of",
    "finalize_request_of",
    "list_request",
    "run_arguments",
]


def check_timeout(timeout: float | None, default: float) -> float:
    """Return the deadline of a call in seconds: ``timeout``, or the client's default when None."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"expected timeout > 0 seconds, got {timeout!r}")
    return float(timeout)


def check_chunk_bytes(chunk_bytes: int | None) -> int | None:
    """Return ``chunk_bytes`` checked: a positive integer, or None (never split)."""
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
        raise ValueError(f"expected chunk_bytes to be a positive integer or None (never split), got {chunk_bytes!r}")
    return chunk_bytes


@contextmanager
def lossd_errors() -> Iterator[None]:
    """Raise a failed call's :class:`~lossd.client.errors.LossdError` ``from`` its ``grpc.RpcError`` (sync or asyncio)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


def channel_credentials(settings: ClientSettings, credentials: grpc.ChannelCredentials | None = None) -> grpc.ChannelCredentials | None:
    """The channel's credentials for ``settings``; None for a plaintext channel without a token.

    TLS uses ``grpc.ssl_channel_credentials`` (the CA file's roots, or the
    system's; the client certificate for mutual TLS). A token rides on every
    call as ``authorization: Bearer <token>`` through
    ``grpc.access_token_call_credentials``, which gRPC sends only over a
    secure channel: over plaintext to this machine, local credentials
    (``LOCAL_TCP``) make the loopback channel count as one. ``credentials``
    given by the caller replace the TLS ones.
    """
    token = settings.bearer_token()
    if credentials is None and settings.secure:
        roots, key, chain = settings.read_pem()
        credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    if token is None:
        return credentials
    if credentials is None:
        local = grpc.LocalConnectionType.UDS if settings.address.startswith("unix") else grpc.LocalConnectionType.LOCAL_TCP
        credentials = grpc.local_channel_credentials(local)
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


# -- requests ----------------------------------------------------------------------------------


def unary_payload(
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[pb.FunctionSpec],
    *,
    tags: TagsLike,
    return_state: bool,
    request_id: str | None,
) -> bytes:
    """The serialized EvaluateRequest of one batch."""
    return serialized_evaluate(arrays, specs, tags=tags_proto(tags), return_state=return_state, request_id=request_id or new_request_id())


def payload_of(request: pb.EvaluateRequest | bytes) -> bytes:
    """A request built by hand, serialized."""
    if isinstance(request, bytes):
        return request
    if not isinstance(request, pb.EvaluateRequest):
        raise TypeError(f"expected a lossd.v1.EvaluateRequest or its bytes, got {type(request).__name__}")
    payload: bytes = request.SerializeToString()
    return payload


def finalize_request_of(states: StatesLike, *, tags: TagsLike, return_state: bool, request_id: str | None) -> pb.FinalizeRequest:
    """The FinalizeRequest merging ``states``."""
    return finalize_request(states, tags=tags_proto(tags), return_state=return_state, request_id=request_id or new_request_id())


def list_request(family: str) -> pb.ListFunctionsRequest:
    """The ListFunctionsRequest of ``family`` ("" for every function)."""
    if not isinstance(family, str):
        raise TypeError(f"expected family to be a string, got {type(family).__name__}")
    return pb.ListFunctionsRequest(family=family)


def run_arguments(functions: Functions, tags: TagsLike) -> tuple[list[pb.FunctionSpec], pb.Tags | None]:
    """A run's FunctionSpecs and Tags."""
    return function_specs(functions), tags_proto(tags)


# -- the core of one client --------------------------------------------------------------------


class _Splittability:
    """Function name or alias -> splittable, from the server's full catalogue; None until learnt."""

    def __init__(self) -> None:
        self.names: dict[str, bool] | None = None


class ClientCore:
    """Settings, request building and the split decision of one client (no network I/O of its own).

    The arguments are those of :class:`lossd.client.Client`.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        settings: ClientSettings | None = None,
        shared_memory: bool = False,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"expected a server address host:port, got {address!r}")
        if credentials is not None and not isinstance(credentials, grpc.ChannelCredentials):
            raise TypeError(f"expected credentials to be grpc.ChannelCredentials, got {type(credentials).__name__}")
        given: dict[str, Any] = {"address": address, "tls": tls, "ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        given.update(token=token, token_file=token_file)
        self.settings = ClientSettings.from_environment(**given) if settings is None else settings.override(**given)
        self.address = self.settings.address
        self.timeout = check_timeout(timeout, DEFAULT_TIMEOUT)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.attempts = attempts
        self.options = channel_options(attempts=attempts, extra=options)
        self.credentials = channel_credentials(self.settings, credentials)
        self._given_credentials = credentials
        self._splittable = _Splittability()
        self.shared_memory = self._shared_memory(shared_memory)
        self.segments = SegmentPool()  # reused shared-memory segments; close() unlinks them
        # This client's compute="local" runs: close() first flushes their Finalize calls to the server.
        self.local_runs: weakref.WeakSet[Any] = weakref.WeakSet()

    def _shared_memory(self, wanted: bool) -> bool:
        """Whether large batches go through shared memory (lossd.client.shared_memory): asked for, and the server on this host."""
        if not isinstance(wanted, bool):
            raise TypeError(f"expected shared_memory to be True or False, got {type(wanted).__name__}")
        if not wanted:
            return False
        reason = local_or_reason(self.address)
        if reason is not None:
            log.warning("shared memory is off: %s; tensors go over the wire", reason)
            return False
        sweep_stale_segments()  # segments of clients killed mid-request (see the module's cleanup rules)
        return True

    def uses_shared_memory(self, arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether this batch goes through a shared-memory segment."""
        return self.shared_memory and worth_sharing(arrays)

    def shared_memory_refused(self, reason: str) -> None:
        """The server refused shared memory: log why, and send this and later batches over the wire."""
        log.warning("the server refused shared memory (%s); tensors go over the wire", reason)
        self.shared_memory = False
        self.segments.close()

    def share_catalogue(self, other: ClientCore) -> None:
        """Use the splittability cache of ``other`` (a twin client to the same server learns once for both)."""
        self._splittable = other._splittable

    def twin_arguments(self) -> dict[str, Any]:
        """Arguments that open another client to the same server with the same settings (async streams use one)."""
        return {
            "settings": self.settings,
            "timeout": self.timeout,
            "attempts": self.attempts,
            "chunk_bytes": self.chunk_bytes,
            "options": self.options,
            "credentials": self._given_credentials,
        }

    def deadline(self, timeout: float | None) -> float:
        """The deadline of one call: ``timeout`` checked, or the client's."""
        return check_timeout(timeout, self.timeout)

    # -- evaluate --------------------------------------------------------------------------------

    @staticmethod
    def prepare(tensors: Mapping[str, Any], functions: Functions) -> tuple[dict[str, np.ndarray], list[pb.FunctionSpec]]:
        """Tensors as numpy arrays and functions as FunctionSpecs, validated before anything is sent."""
        return arrays_of(tensors), function_specs(functions)

    def over_chunk_size(self, arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether a batch is larger than ``chunk_bytes`` (never, when splitting is off)."""
        return self.chunk_bytes is not None and batch_bytes(arrays) > self.chunk_bytes

    def needs_catalogue(self, specs: Sequence[pb.FunctionSpec], arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether the split decision for this batch needs ListFunctions first (call it, then :meth:`learn`)."""
        return self._splittable.names is None and self.over_chunk_size(arrays)

    def may_split(self, specs: Sequence[pb.FunctionSpec], arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether a batch may go in parts: over chunk_bytes and every function splittable (by the learnt catalogue)."""
        if not self.over_chunk_size(arrays):
            return False
        names = self._splittable.names
        if names is None:
            raise RuntimeError("lossd bug: the split decision was asked before the catalogue was learnt")
        return all(names.get(s.name, False) for s in specs)

    def should_chunk(self, specs: Sequence[pb.FunctionSpec], arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether a unary evaluation goes through EvaluateStream in parts (and no function wants per-element values)."""
        return not wants_per_element(specs) and self.may_split(specs, arrays)

    def stream_messages(
        self,
        batches: Iterable[Mapping[str, Any]],
        functions: Functions,
        *,
        tags: TagsLike,
        return_state: bool,
        request_id: str | None,
        catalogue: Callable[[], pb.ListFunctionsResponse],
        nan_policy: str | None = None,
    ) -> Iterator[bytes]:
        """The serialized messages of an EvaluateStream call, each batch read, split when allowed, and encoded in turn.

        ``catalogue`` is the transport's ListFunctions, called at most once,
        when a batch over the chunk size first needs the split decision.
        """
        specs = function_specs(functions)
        tags_msg = tags_proto(tags)
        rid = request_id or new_request_id()
        nan_policy_value(nan_policy)  # a bad name fails before the first batch is read
        for index, tensors in enumerate(batches):
            arrays = arrays_of(tensors)
            if self.needs_catalogue(specs, arrays):
                catalogue()
            parts = split_rows(arrays, self.chunk_bytes) if self.chunk_bytes and self.may_split(specs, arrays) else [arrays]
            # The first message carries the nan_policy, for the whole stream.
            yield from batch_requests(
                index, parts, specs, tags=tags_msg, return_state=return_state, request_id=rid, nan_policy=nan_policy if index == 0 else None
            )

    def learn(self, family: str, response: pb.ListFunctionsResponse) -> pb.ListFunctionsResponse:
        """Cache which functions are splittable from a full catalogue (a family's is partial, so it is not kept)."""
        if not family:
            self._splittable.names = splittable_names(response)
        return response
