"""A real lossd gRPC server on port 0, started once per test session in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar

import grpc
import pytest
from integration.wire_recording import MethodRecorder
from replica import no_idle_trim

from lossd.server.app import RunningServer, create_server
from lossd.server.monitoring.events import Subscriber
from lossd.server.settings import Settings


class ServerThread:
    """Runs ``create_server(settings)`` on its own event loop in a daemon thread."""

    def __init__(
        self, settings: Settings, *, subscribers: Sequence[Subscriber] = (), interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    ) -> None:
        self.settings = settings
        self.subscribers = subscribers
        self.interceptors = interceptors
        self.loop = asyncio.new_event_loop()
        self.running: RunningServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lossd-test-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.running = self.loop.run_until_complete(
                create_server(self.settings, subscribers=self.subscribers, interceptors=self.interceptors)
            )
            no_idle_trim(self.running)
        except BaseException as exc:  # surfaced in start()
            self._error = exc
        self._ready.set()
        if self._error is None:
            self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        assert self.running is not None
        return self.running.address

    def stop(self) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


def start_server(
    *, subscribers: Sequence[Subscriber] = (), interceptors: Sequence[grpc.aio.ServerInterceptor] = (), **overrides: object
) -> ServerThread:
    settings = Settings(grpc_port=0, http_port=0, device="cpu", **overrides)  # type: ignore[arg-type]
    return ServerThread(settings, subscribers=subscribers, interceptors=interceptors).start()


Interceptor = TypeVar("Interceptor", bound=grpc.aio.ServerInterceptor)


def serving_with(interceptor: Interceptor, **overrides: object) -> Iterator[tuple[ServerThread, Interceptor]]:
    """A fixture's body: a server of its own behind ``interceptor`` (``overrides``: its settings), stopped afterwards."""
    server = start_server(interceptors=[interceptor], **overrides)
    yield server, interceptor
    server.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """The session's server: a real grpc.aio lossd server bound to 127.0.0.1 on a free port."""
    s = start_server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def address(server: ServerThread) -> str:
    return server.address


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[ServerThread, MethodRecorder]]:
    """A server of its own whose LossService calls are recorded, in order, by method."""
    yield from serving_with(MethodRecorder())
