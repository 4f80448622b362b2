"""The gateway's gRPC backends: round-robin over replicas, with health-aware failover.

Each call starts at the next replica in turn and skips replicas marked down;
a replica that answers UNAVAILABLE is marked down for ``cooldown`` seconds.
The call moves on to the next one within the same deadline only when the
request cannot have reached the first one's handler: the connection could
not be made, or the replica said to retry (RetryInfo or a retry pushback,
as a draining or overloaded replica does). A replica lost during the call
("Socket closed") may have died of this very request, so it is not replayed
onto the next (the client's rule, :class:`lossd.client.errors.UnavailableError`).
Every other status is the answer and goes back to the client. When every replica is down, they are all tried anyway (a cooldown is
a guess, not a verdict). ``check()`` asks each replica's grpc.health.v1
service and refreshes the marks; /readyz uses it.

Security (README "Security"): the addresses of ``settings.backends`` (the
standalone gateway) are reached over TLS when ``backend_tls`` or
``backend_tls_ca_file`` is set, with ``backend_tls_cert_file``/``_key_file``
as the client certificate for backends that require mutual TLS. Each call
carries the caller's ``Authorization`` header as the gateway received it (the
backends see who calls and check the token themselves), unless
``backend_token_file`` names the gateway's own token, which then replaces it.
A bearer token is never sent in clear text to a backend off this machine:
that configuration refuses to start. Any other address (the in-process
server's private socket) is plaintext.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.client.errors import UnavailableError, from_rpc_error
from lossd.client.settings import is_loopback
from lossd.server.security.policy import InsecureBindError
from lossd.server.security.watch import FileSignature, signature
from lossd.server.settings import GRPC_OPTIONS, Settings
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["Backend", "BackendPool", "BackendToken", "NoBackendsError", "backend_credentials"]

T = TypeVar("T")

Call = Callable[[pb_grpc.LossServiceStub, float], Awaitable[T]]  # (stub, timeout seconds) -> response


class NoBackendsError(RuntimeError):
    """The pool was built without any backend address."""


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {setting} {path}: {exc.strerror}") from exc


def backend_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials for the backends from the ``backend_tls*`` settings; None for plaintext."""
    cert, key = settings.backend_tls_cert_file, settings.backend_tls_key_file
    if (cert is None) != (key is None):
        raise ValueError("expected both backend_tls_cert_file and backend_tls_key_file (a client certificate and its key), or neither")
    ca = settings.backend_tls_ca_file
    if not (settings.backend_tls or ca is not None or cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("backend_tls_ca_file", ca) if ca is not None else None,
        private_key=_read("backend_tls_key_file", key) if key is not None else None,
        certificate_chain=_read("backend_tls_cert_file", cert) if cert is not None else None,
    )


class BackendToken:
    """The gateway's own token for its backends: the first line of a file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: FileSignature = ()
        self._header = ""
        self.header()  # an unreadable or empty file refuses to start

    def header(self) -> str:
        """``Bearer <token>``; a file that became unreadable or empty keeps the previous token."""
        current = signature([self.path])
        if current != self._signature:
            try:
                text = _read("backend_token_file", self.path).decode().strip()
                if not text:
                    raise ValueError(f"backend_token_file {self.path}: expected a token, got an empty file")
            except ValueError:
                if not self._header:
                    raise
                return self._header
            self._signature, self._header = current, f"Bearer {text.splitlines()[0].strip()}"
        return self._header


class _ReplaceAuthorization(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc ships no stubs
    """Sends the gateway's own token in place of any ``authorization`` the call carries."""

    def __init__(self, token: BackendToken) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: Any, request: Any) -> Any:
        kept = [(k, v) for k, v in (client_call_details.metadata or ()) if k != "authorization"]
        metadata = grpc.aio.Metadata(*kept, ("authorization", self.token.header()))
        return await continuation(client_call_details._replace(metadata=metadata), request)


def _refuse_clear_text_tokens(addresses: Sequence[str], settings: Settings) -> None:
    """A token (forwarded or the gateway's own) must not cross a network unencrypted."""
    sends_tokens = settings.auth_tokens_file is not None or settings.backend_token_file is not None
    exposed = [a for a in addresses if not is_loopback(a)]
    if sends_tokens and exposed and not settings.allow_insecure:
        raise InsecureBindError(
            f"refusing to send bearer tokens in clear text to the backend {exposed[0]}: set LOSSD_BACKEND_TLS_CA_FILE "
            "(or LOSSD_BACKEND_TLS=true for the system's roots), or LOSSD_ALLOW_INSECURE=true to send them anyway"
        )


@dataclass
class Backend:
    """One backend replica and its health as the pool has seen it."""

    address: str
    down_until: float = 0.0  # monotonic time before which the replica is skipped
    failures: int = 0

    def is_up(self, now: float) -> bool:
        return now >= self.down_until


class BackendPool:
    """gRPC channels to lossd replicas; channels are made lazily on the running event loop.

    Addresses equal to ``settings.backends`` get the backend TLS and token
    settings (see the module docstring); others are plaintext.
    """

    def __init__(
        self, addresses: Sequence[str], settings: Settings, *, cooldown: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not addresses:
            raise NoBackendsError("expected at least one gRPC backend address, got none")
        self.backends = [Backend(a) for a in addresses]
        self.settings = settings
        self.cooldown = cooldown
        self._clock = clock
        self._turn = itertools.count()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        remote = list(addresses) == list(settings.backends)
        self._credentials = backend_credentials(settings) if remote else None
        token = BackendToken(settings.backend_token_file) if remote and settings.backend_token_file is not None else None
        self._interceptors = [_ReplaceAuthorization(token)] if token is not None else []
        if remote and self._credentials is None:
            _refuse_clear_text_tokens(addresses, settings)
        self._options = [
            *GRPC_OPTIONS,
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Fail fast on a dead replica instead of waiting out the reconnect backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]

    def channel(self, address: str) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # channels belong to the loop they were made on
            self._channels = {}
            self._loop = loop
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options, interceptors=self._interceptors)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors)
            self._channels[address] = channel
        return channel

    def order(self) -> list[Backend]:
        """Replicas in the order this call tries them: round robin, replicas marked down last."""
        n = len(self.backends)
        start = next(self._turn) % n
        rotated = self.backends[start:] + self.backends[:start]
        now = self._clock()
        return [b for b in rotated if b.is_up(now)] + [b for b in rotated if not b.is_up(now)]

    def _mark(self, backend: Backend, up: bool) -> None:
        if up:
            backend.down_until, backend.failures = 0.0, 0
        else:
            backend.failures += 1
            backend.down_until = self._clock() + self.cooldown

    async def call(self, fn: Call[T]) -> T:
        """Run ``fn(stub, timeout)`` on one replica, failing over on UNAVAILABLE within one deadline."""
        deadline = self._clock() + self.settings.request_timeout_seconds
        error: grpc.aio.AioRpcError | None = None
        for backend in self.order():
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                result = await fn(pb_grpc.LossServiceStub(self.channel(backend.address)), remaining)  # type: ignore[no-untyped-call]
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._mark(backend, up=False)
                lost = from_rpc_error(exc)
                if isinstance(lost, UnavailableError) and not (lost.unreached or lost.retry_marked):
                    raise  # it may have reached the handler: never replayed onto another replica
                error = exc
                continue
            self._mark(backend, up=True)
            return result
        if error is not None:
            raise error
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "deadline exceeded before any backend answered"
        )

    async def check(self, timeout: float = 2.0) -> dict[str, str]:
        """Each replica's grpc.health.v1 status (SERVING, NOT_SERVING, UNREACHABLE...); refreshes the marks."""

        async def one(backend: Backend) -> str:
            stub = health_pb2_grpc.HealthStub(self.channel(backend.address))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                self._mark(backend, up=False)
                return "UNREACHABLE" if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else exc.code().name
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            self._mark(backend, up=serving)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        statuses = await asyncio.gather(*(one(b) for b in self.backends))
        return {b.address: s for b, s in zip(self.backends, statuses, strict=True)}

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
