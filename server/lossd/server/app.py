"""Server factory and the one-process service of ``lossd serve``: gRPC, gateway, metrics.

``create_server(settings)`` returns a started grpc.aio server with its bound
port (tests pass port 0); ``serve(settings)`` adds the HTTP gateway on the
same event loop and shuts both down gracefully on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd.kernels import select_device
from lossd.kernels.budget import Budget
from lossd.server.admission import Admission, AdmissionLimits
from lossd.server.affinity import pin_event_loop
from lossd.server.allocator import IdleTrim, limit_malloc_arenas, reuse_large_buffers, set_torch_threads
from lossd.server.monitoring.events import Subscriber
from lossd.server.monitoring.multiprocess import count_in_files
from lossd.server.observability.logging import configure_logging, uvicorn_log_options
from lossd.server.observability.tracing import Tracing
from lossd.server.observability.wiring import instrument_gateway, server_interceptors
from lossd.server.security import (
    Authenticator,
    AuthInterceptor,
    HttpsReloader,
    TlsFiles,
    check_bind,
    grpc_server_credentials,
    reflection_enabled,
)
from lossd.server.service import LossService
from lossd.server.settings import GRPC_OPTIONS, Settings
from lossd.server.wire_request import add_loss_service
from lossd.v1 import lossd_pb2 as pb

__all__ = [
    "RunningServer",
    "create_server",
    "serve",
    "SERVICE_NAME",
    "bind_http_socket",
    "check_port_free",
    "exit_if_compute_busy",
    "reload_credentials",
]

log = logging.getLogger("lossd.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


@dataclass
class RunningServer:
    """A started gRPC server: ``address`` is host:port as bound (port 0 resolved)."""

    server: grpc.aio.Server
    port: int
    host: str
    service: LossService
    health: health.aio.HealthServicer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def drain(self, seconds: float, interrupt: asyncio.Event | None = None) -> None:
        """Report NOT_SERVING at once, then keep serving for ``seconds`` (or until ``interrupt`` is set).

        Load balancers and Kubernetes readiness probes see NOT_SERVING (and the
        gateway's /readyz 503) and stop sending; calls and streams in flight,
        and those still arriving, are served meanwhile."""
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining for %.1fs: health NOT_SERVING, still serving calls in flight", seconds)
        waiter = asyncio.Event() if interrupt is None else interrupt
        try:
            await asyncio.wait_for(waiter.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace``, then stop."""
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.service.close()


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):  # "" is the whole server, as grpc health clients ask by default
        await servicer.set(name, status)


def _bound_socket(host: str, port: int, what: str, setting: str) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot bind {what} to {host}:{port} (setting host, LOSSD_HOST): {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and uvicorn bind: TIME_WAIT is no conflict
        sock.bind(address)
    except OSError as exc:
        sock.close()
        env = f"LOSSD_{setting.upper()}"
        raise OSError(f"cannot bind {what} to {host}:{port} (setting {setting}, {env}): {exc.strerror or exc}") from None
    return sock


def check_port_free(host: str, port: int, what: str, setting: str) -> None:
    """Raise OSError naming ``setting`` when ``host:port`` cannot be bound (port 0 always can)."""
    if port != 0:
        _bound_socket(host, port, what, setting).close()


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound now: a port in use fails start-up before anything is announced."""
    sock = _bound_socket(host, port, "HTTP", "http_port")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def create_server(
    settings: Settings,
    *,
    subscribers: Sequence[Subscriber] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    authenticator: Authenticator | None = None,
    private_socket: Path | None = None,
    tracing: Tracing | None = None,
    reuse_port: bool = False,
    holding: Callable[[], int] | None = None,
) -> RunningServer:
    """Build, bind and start the gRPC server described by ``settings``.

    TLS, tokens and reflection follow ``settings`` (README "Security");
    ``authenticator`` shares one token store and refusal counter with the
    gateway. ``private_socket`` adds a plaintext Unix socket for the in-process
    gateway (tokens still apply there). ``tracing`` adds a span per call (README "Logs and traces").
    ``reuse_port``: a worker of ``lossd serve --workers N`` shares the port with the others
    (SO_REUSEPORT: the kernel spreads new connections over them). ``holding``: the bytes
    of request tensors the subscribers still hold after the responses (the idle trim waits for 0).
    """
    check_bind(settings)
    tls = TlsFiles.from_settings(settings)
    credentials = grpc_server_credentials(tls) if tls is not None else None  # bad files fail here, before binding
    if authenticator is None:
        from prometheus_client import CollectorRegistry

        authenticator = Authenticator.from_settings(settings, CollectorRegistry())
    interceptors = server_interceptors(settings, tracing, interceptors)  # trace span outermost, request log inside
    if authenticator is not None:
        interceptors = [*interceptors, AuthInterceptor(authenticator)]  # innermost: monitoring counts refusals too
    device = select_device(settings.device)
    bind = f"{settings.host}:{settings.grpc_port}"
    if not reuse_port:
        check_port_free(settings.host, settings.grpc_port, "gRPC", "grpc_port")  # gRPC core would print its own error lines
    limit_malloc_arenas(settings.malloc_arenas)  # before the server's threads start: they share the bounded set
    if settings.reuse_large_buffers:
        reuse_large_buffers(settings.max_message_bytes)
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            *GRPC_OPTIONS,
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    admission = Admission(
        AdmissionLimits(
            max_concurrent_requests=settings.max_concurrent_requests,
            max_queued_requests=settings.max_queued_requests,
            max_queued_bytes=settings.max_queued_bytes,
            large_request_bytes=settings.large_request_bytes,
            compute_threads=settings.compute_threads,
            retry_after_seconds=settings.retry_after_seconds,
            inline_request_bytes=settings.inline_request_bytes,
            max_concurrent_memory_bytes=settings.max_concurrent_memory_bytes,
        )
    )
    service = LossService(
        device,
        exact_state_limit=settings.exact_state_limit,
        allow_shared_memory=settings.allow_shared_memory,
        stream_idle_seconds=settings.stream_idle_seconds,
        admission=admission,
        # Each request within its own budget, and the work running at once within the admission's memory ledger.
        budget=Budget(settings.max_request_memory_bytes, settings.max_message_bytes, admission.memory.reserve),
        subscribers=subscribers,
    )
    # Buffers kept through a burst, given back after it (and after the monitoring work that holds its tensors).
    service.admission.on_idle = IdleTrim(service.admission.idle, holding=holding)
    # The generated registration, Evaluate's tensor bytes left in the received message, bytes that do not parse INVALID_ARGUMENT.
    add_loss_service(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled(settings):
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
    try:
        port = server.add_secure_port(bind, credentials) if credentials is not None else server.add_insecure_port(bind)
        if private_socket is not None:
            server.add_insecure_port(f"unix:{private_socket}")
    except RuntimeError:
        port = 0
    if port == 0:
        service.close()
        raise OSError(f"cannot bind gRPC to {bind} (setting grpc_port, LOSSD_GRPC_PORT)")
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("lossd gRPC serving on %s:%d (%s, device %s)", settings.host, port, "TLS" if tls else "plaintext", device)
    return RunningServer(server, port, settings.host, service, health_servicer)


async def serve(settings: Settings) -> None:
    """Run gRPC, the HTTP gateway (with /metrics and the dashboard) until SIGINT/SIGTERM, then drain and stop.

    Both ports are bound before "lossd serving" is printed, so a port in use
    fails start-up with an OSError naming the setting and nothing announced.
    On the first SIGINT/SIGTERM: NOT_SERVING at once, ``drain_seconds`` of
    service, then ``grace_seconds`` for calls still running; a second signal
    ends the drain early. Compute threads stuck past the grace do not keep the
    process alive: it exits after a last log line.
    """
    from lossd.server.gateway import create_app
    from lossd.server.monitoring import Monitoring
    from lossd.server.supervisor import WorkerPool, private_directory
    from lossd.server.worker_watch import WorkersCollector

    check_bind(settings)  # before anything heavy starts
    if settings.pin_event_loop and settings.workers == 1:  # with workers, each pins its own
        pin_event_loop(0)  # before the gRPC server starts its threads: they inherit it
    configure_logging(settings)
    set_torch_threads(settings.compute_threads, settings.torch_threads)  # process-wide: here, not in create_server (tests share a process)
    tracing = Tracing.from_settings(settings, os.environ)
    http_socket = bind_http_socket(settings.host, settings.http_port)
    # With workers, this process supervises them and serves the gateway (lossd.server.supervisor).
    workers_dir = private_directory() if settings.workers > 1 else None
    private_dir: tempfile.TemporaryDirectory[str] | None = None
    pool: WorkerPool | None = None
    try:
        if workers_dir is not None:
            count_in_files(workers_dir)  # before the first metric: the gateway's counters sum with the workers'
        monitoring = Monitoring(settings, workers_dir=workers_dir)
        authenticator = Authenticator.from_settings(settings, monitoring.registry)
        tls = TlsFiles.from_settings(settings)
        if tracing is not None:
            tracing.install()
        if workers_dir is not None:
            pool = WorkerPool(settings, workers_dir, monitoring.history)
            monitoring.exposed.register(WorkersCollector(pool.views))
            await pool.start()
            backend: RunningServer | WorkerPool = pool
            local = pool.backends
        else:
            # Under TLS the in-process gateway reaches gRPC over a private Unix socket: the
            # certificate need not name the bind address, and nothing else can connect there.
            private_dir = tempfile.TemporaryDirectory(prefix="lossd-") if tls is not None else None
            private_socket = Path(private_dir.name) / "grpc.sock" if private_dir is not None else None
            running = await create_server(
                settings, **monitoring.server_hooks(), authenticator=authenticator, private_socket=private_socket, tracing=tracing
            )
            backend = running
            local = [f"unix:{private_socket}" if private_socket is not None else running.address]
    except BaseException:
        http_socket.close()
        if pool is not None:
            await pool.stop(0)
        if workers_dir is not None:
            shutil.rmtree(workers_dir, ignore_errors=True)
        raise
    app = create_app(settings, backends=settings.backends or local, monitoring=monitoring, authenticator=authenticator)
    instrument_gateway(app, settings, tracing)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        **uvicorn_log_options(settings),
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.grace_seconds)),
        **(tls.uvicorn_options() if tls is not None else {}),
    )
    config.load()  # builds the SSLContext now, so that rotation can reload it in place
    http = _HttpServer(config)
    reloader = HttpsReloader(tls, config.ssl) if tls is not None and config.ssl is not None else None

    # Signals are ours alone (uvicorn's capture is off): the first starts the drain, a second ends it.
    signals = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _second_signal_ends_drain, signals)
    loop.add_signal_handler(signal.SIGHUP, reload_credentials, authenticator, reloader, True)
    rotation = asyncio.create_task(_watch_rotation(reloader)) if reloader is not None else None
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    http_port = http_socket.getsockname()[1]
    workers = f", {settings.workers} workers" if pool is not None else ""
    print(
        f"lossd serving gRPC on {backend.address}{' (TLS)' if tls else ''}, HTTP on {'https' if tls else 'http'}://{settings.host}:{http_port}"
        f" (device {select_device(settings.device)}{workers})",
        flush=True,
    )
    signal_task = asyncio.create_task(signals.wait())
    await asyncio.wait({http_task, signal_task}, return_when=asyncio.FIRST_COMPLETED)
    signals.clear()  # a signal from here on ends the drain
    if not http_task.done():
        await backend.drain(settings.drain_seconds, signals)
    log.info("stopping (grace %.1fs)", settings.grace_seconds)
    http.should_exit = True
    await backend.stop(settings.grace_seconds)
    await http_task
    signal_task.cancel()
    if rotation is not None:
        rotation.cancel()
    if private_dir is not None:
        private_dir.cleanup()
    if tracing is not None:
        tracing.shutdown()  # flush the spans not exported yet
    if isinstance(backend, WorkerPool):
        monitoring.close()
        backend.close_directory()
        return
    exit_if_compute_busy(backend.service)


def exit_if_compute_busy(service: LossService, who: str = "") -> None:
    """After the grace: exit now, without the compute threads still running (``who`` names a worker in the log).

    A thread cannot be interrupted; waiting for it is how a 100,000-degree sphereface
    kept a stopped server alive for an hour. Its call has already been answered."""
    busy = service.admission.running()
    if busy:
        log.warning("%s%d compute thread(s) still busy after the grace period; exiting without them", who, busy)
        logging.shutdown()
        os._exit(0)


def _second_signal_ends_drain(signals: asyncio.Event) -> None:
    if signals.is_set():
        log.info("second signal: stopping now")
    signals.set()


class _HttpServer(uvicorn.Server):
    """uvicorn's server without its own signal handling (serve() drains on SIGTERM first)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


ROTATION_CHECK_SECONDS = 5.0


def reload_credentials(authenticator: Authenticator | None, reloader: HttpsReloader | None = None, force: bool = True) -> None:
    """SIGHUP: re-read the token file and the HTTPS certificate now (gRPC re-reads its own on change)."""
    log.info("SIGHUP: reloading tokens and certificates")
    if authenticator is not None:
        authenticator.store.reload()
    if reloader is not None:
        reloader.reload_if_changed(force=force)


async def _watch_rotation(reloader: HttpsReloader) -> None:
    """Load a rotated HTTPS certificate within ROTATION_CHECK_SECONDS of its files changing."""
    while True:
        await asyncio.sleep(ROTATION_CHECK_SECONDS)
        reloader.reload_if_changed()
