"""Server factory and the one-process service of ``lossd serve``: gRPC, gateway, metrics.

``create_server(settings)`` returns a started grpc.aio server with its bound
port (tests pass port 0); ``serve(settings)`` adds the HTTP gateway on the
same event loop and shuts both down gracefully on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lossd.kernels import select_device
from lossd.server.allocator import reuse_large_buffers
from lossd.server.monitoring.events import Subscriber
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
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = ["RunningServer", "create_server", "serve", "SERVICE_NAME"]

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

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace``, then stop."""
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.service.close()


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):  # "" is the whole server, as grpc health clients ask by default
        await servicer.set(name, status)


async def create_server(
    settings: Settings,
    *,
    subscribers: Sequence[Subscriber] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    authenticator: Authenticator | None = None,
    private_socket: Path | None = None,
) -> RunningServer:
    """Build, bind and start the gRPC server described by ``settings``.

    TLS, tokens and reflection follow ``settings`` (README "Security");
    ``authenticator`` shares one token store and refusal counter with the
    gateway. ``private_socket`` adds a plaintext Unix socket for the in-process
    gateway (tokens still apply there).
    """
    check_bind(settings)
    tls = TlsFiles.from_settings(settings)
    credentials = grpc_server_credentials(tls) if tls is not None else None  # bad files fail here, before binding
    if authenticator is None:
        from prometheus_client import CollectorRegistry

        authenticator = Authenticator.from_settings(settings, CollectorRegistry())
    if authenticator is not None:
        interceptors = [*interceptors, AuthInterceptor(authenticator)]  # innermost: monitoring counts refusals too
    device = select_device(settings.device)
    if settings.reuse_large_buffers:
        reuse_large_buffers(settings.max_message_bytes)
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            *GRPC_OPTIONS,
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    service = LossService(
        device,
        exact_state_limit=settings.exact_state_limit,
        compute_threads=settings.compute_threads,
        subscribers=subscribers,
    )
    pb_grpc.add_LossServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled(settings):
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
    bind = f"{settings.host}:{settings.grpc_port}"
    port = server.add_secure_port(bind, credentials) if credentials is not None else server.add_insecure_port(bind)
    if private_socket is not None:
        server.add_insecure_port(f"unix:{private_socket}")
    if port == 0:
        raise OSError(f"could not bind gRPC to {settings.host}:{settings.grpc_port}")
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("lossd gRPC serving on %s:%d (%s, device %s)", settings.host, port, "TLS" if tls else "plaintext", device)
    return RunningServer(server, port, settings.host, service, health_servicer)


async def serve(settings: Settings) -> None:
    """Run gRPC, the HTTP gateway (with /metrics and the dashboard) until SIGINT/SIGTERM."""
    import uvicorn

    from lossd.server.gateway import create_app
    from lossd.server.monitoring import Monitoring

    check_bind(settings)  # before anything heavy starts
    monitoring = Monitoring(settings)
    authenticator = Authenticator.from_settings(settings, monitoring.registry)
    tls = TlsFiles.from_settings(settings)
    # Under TLS the in-process gateway reaches gRPC over a private Unix socket: the
    # certificate need not name the bind address, and nothing else can connect there.
    private_dir = tempfile.TemporaryDirectory(prefix="lossd-") if tls is not None else None
    private_socket = Path(private_dir.name) / "grpc.sock" if private_dir is not None else None
    running = await create_server(settings, **monitoring.server_hooks(), authenticator=authenticator, private_socket=private_socket)
    local = f"unix:{private_socket}" if private_socket is not None else running.address
    app = create_app(settings, backends=settings.backends or [local], monitoring=monitoring, authenticator=authenticator)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_level=settings.log_level,
        lifespan="on",
        **(tls.uvicorn_options() if tls is not None else {}),
    )
    config.load()  # builds the SSLContext now, so that rotation can reload it in place
    http = uvicorn.Server(config)
    reloader = HttpsReloader(tls, config.ssl) if tls is not None and config.ssl is not None else None

    # uvicorn captures SIGINT/SIGTERM itself while it serves (and re-raises them
    # after); whichever notices first, uvicorn finishing or our own handler, starts
    # the shutdown: in-flight gRPC calls get `grace_seconds` to finish.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, authenticator, reloader, True)
    rotation = asyncio.create_task(_watch_rotation(reloader)) if reloader is not None else None
    http_task = asyncio.create_task(http.serve())
    stop_task = asyncio.create_task(stop.wait())
    print(
        f"lossd serving gRPC on {running.address}{' (TLS)' if tls else ''}, HTTP on {'https' if tls else 'http'}://{settings.host}:{settings.http_port}"
        f" (device {running.service.device})",
        flush=True,
    )
    await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down (grace %.1fs)", settings.grace_seconds)
    http.should_exit = True
    await running.stop(settings.grace_seconds)
    await http_task
    stop_task.cancel()
    if rotation is not None:
        rotation.cancel()
    if private_dir is not None:
        private_dir.cleanup()


ROTATION_CHECK_SECONDS = 5.0


def _reload(authenticator: Authenticator | None, reloader: HttpsReloader | None, force: bool) -> None:
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
