"""A whole lossd replica in a background thread: gRPC server, monitoring and the HTTP gateway.

What ``lossd serve`` runs (:func:`lossd.server.app.serve`), on one event loop of
its own, with both ports bound to 0 so that tests can start several side by
side. With ``backends`` it is a gateway alone, forwarding to those addresses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import uvicorn

from lossd.server.app import RunningServer, create_server
from lossd.server.gateway import create_app
from lossd.server.monitoring import Monitoring
from lossd.server.settings import Settings

__all__ = ["Replica"]


def no_idle_trim(running: RunningServer) -> None:
    """Turn off a server's idle trim when it runs in the pytest process.

    Its gc.collect() would collect other tests' garbage during whichever test is running, and an
    unclosed socket found there fails that test (filterwarnings = error). lossd serve processes keep
    theirs; tests/unit/server/test_allocator.py covers the trim itself."""
    running.service.admission.on_idle = None


class Replica:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is the gateway, ``grpc_address`` the server."""

    def __init__(self, *, backends: Sequence[str] = (), **overrides: object) -> None:
        self.settings = Settings(grpc_port=0, http_port=0, device="cpu", **overrides)  # type: ignore[arg-type]
        self.backends = list(backends)
        self.monitoring: Monitoring | None = None
        self.running: RunningServer | None = None
        self.app: Any = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._http: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lossd-test-replica", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        assert self.running is not None, "a gateway-only replica has no gRPC server"
        return self.running.address

    async def _start(self) -> None:
        monitoring = None
        if not self.backends:
            monitoring = self.monitoring = Monitoring(self.settings)
            self.running = await create_server(self.settings, **monitoring.server_hooks())
            no_idle_trim(self.running)
        app = self.app = create_app(self.settings, backends=self.backends or [self.running.address], monitoring=monitoring)  # type: ignore[union-attr]
        if monitoring is None:
            self.monitoring = app.state.monitoring
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws="none")
        self._http = uvicorn.Server(config)
        self._serving = asyncio.get_running_loop().create_task(self._http.serve())
        while not self._http.started:
            if self._serving.done():
                self._serving.result()  # raises the startup error
            await asyncio.sleep(0.01)
        self.port = self._http.servers[0].sockets[0].getsockname()[1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced in start()
            self._error = exc
        self._ready.set()
        if self._error is None:
            self._loop.run_forever()

    def start(self) -> Replica:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    async def _stop(self) -> None:
        if self._http is not None and self._serving is not None:
            self._http.should_exit = True
            await self._serving
        if self.running is not None:
            await self.running.stop(0.5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
