"""What both clients are built from: their arguments, resolved once into a :class:`~lossd.client.core.ClientCore`."""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

import grpc

from lossd.client.buffers import reuse_for_messages
from lossd.client.channel import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT
from lossd.client.core import ClientCore
from lossd.client.messages import DEFAULT_CHUNK_BYTES
from lossd.client.settings import ClientSettings

__all__ = ["ClientBase"]


class ClientBase(abc.ABC):
    """A connection's settings, shared by :class:`~lossd.client.Client` and :class:`~lossd.client.AsyncClient`.

    ``address`` defaults to ``LOSSD_SERVER`` (then 127.0.0.1:50051).
    ``timeout``: default deadline of every call, in seconds. ``attempts``:
    tries per call answered UNAVAILABLE, or RESOURCE_EXHAUSTED by an
    overloaded server with a retry hint (never a request over a budget or
    a size limit; :mod:`lossd.client.retries`); 1 disables retries.
    ``chunk_bytes``: batches larger than this go in parts over a stream when
    every function is splittable (None: never split). ``options``: extra gRPC
    channel options, overriding the defaults by name. ``tls`` (system
    roots), ``ca_file``, ``cert_file`` and ``key_file`` (mutual TLS): a TLS
    channel; ``token`` or ``token_file``: a bearer token on every call. Each
    of these defaults to its ``LOSSD_*`` variable (:mod:`lossd.client.settings`),
    or to ``settings`` when given. ``credentials``: ready-made gRPC channel
    credentials instead of the TLS files. ``shared_memory``: large batches of
    ``evaluate`` travel in a POSIX shared-memory segment when the server is
    on this host and allows it, else over the wire (:mod:`lossd.client.shared_memory`).

    The first client of a process raises glibc's malloc thresholds so that
    freed message buffers up to twice ``chunk_bytes`` are reused instead of
    faulted in again per call (:mod:`lossd.client.buffers`; off with
    ``LOSSD_REUSE_LARGE_BUFFERS=false``).
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
        self.core = ClientCore(
            address,
            timeout=timeout,
            attempts=attempts,
            chunk_bytes=chunk_bytes,
            options=options,
            credentials=credentials,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token=token,
            token_file=token_file,
            settings=settings,
            shared_memory=shared_memory,
        )
        reuse_for_messages(self.core.chunk_bytes or DEFAULT_CHUNK_BYTES)
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the channel of ``self.core`` (each client its own kind)."""

    @property
    def address(self) -> str:
        """The server's address."""
        return self.core.address

    @property
    def settings(self) -> ClientSettings:
        """Where and how this client connects (the token hidden from repr)."""
        return self.core.settings

    @property
    def timeout(self) -> float:
        """The default deadline of a call, in seconds."""
        return self.core.timeout

    @property
    def chunk_bytes(self) -> int | None:
        """Batches larger than this go in parts when allowed (None: never)."""
        return self.core.chunk_bytes
