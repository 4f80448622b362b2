"""``lossd serve --workers N``: N worker processes share the gRPC port; this process supervises them.

One Python process computes on about one core at a time (the GIL, however
many compute threads release it), so small requests on a many-core host
need processes. With ``workers`` > 1 the ``lossd serve`` process becomes a
supervisor:

- It holds the gRPC port (a bound, unlistening SO_REUSEPORT socket, so a
  port 0 is resolved once and stays this server's) and starts N workers
  (:mod:`lossd.server.worker`) that listen on it with SO_REUSEPORT: the
  kernel spreads new connections over them. A client's channel is one
  connection, so its calls stay on one worker; many clients (ranks, callers)
  spread. Evaluate, streams and Finalize carry their whole state, so any
  worker can serve any call.
- It serves the HTTP gateway, /metrics and the dashboard itself, forwarding
  to the workers' private sockets round-robin with failover
  (:class:`~lossd.server.gateway.backends.BackendPool`).
- Monitoring stays exact across workers (:mod:`lossd.server.monitoring.multiprocess`):
  counters in prometheus-client's multiprocess files, history records sent
  to this process's one history.
- A worker that exits unexpectedly, or answers no health check for
  ``worker_timeout_seconds`` (then it is killed; :mod:`.worker_watch`), is
  restarted (1 s, doubling up to 30 s while it keeps failing); its counts
  stay. SIGTERM/SIGINT drains every worker (each reports NOT_SERVING and
  serves ``drain_seconds``), a second one ends the drain; then the workers
  stop within their grace, and any left after that are killed.

Everything private lives in one 0700 temporary directory, removed at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lossd.server.monitoring.history import History
from lossd.server.monitoring.multiprocess import RecordReceiver, forget_process
from lossd.server.settings import Settings
from lossd.server.worker_env import ENV_DIR, ENV_INDEX, ENV_KEY, ENV_SETTINGS, socket_of
from lossd.server.worker_watch import WorkerView, answers_health

__all__ = ["WorkerStartError", "WorkerPool", "private_directory", "reserve_port"]

log = logging.getLogger("lossd.server")

START_SECONDS = 120.0  # a worker imports torch and binds: minutes only on a cold, loaded host
FIRST_BACKOFF, MAX_BACKOFF, HEALTHY_SECONDS = 1.0, 30.0, 60.0
POLL_SECONDS = 0.2


def private_directory() -> Path:
    """A fresh 0700 directory for the metric files and sockets of one run (mkdtemp makes it 0700)."""
    return Path(tempfile.mkdtemp(prefix="lossd-workers-"))


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT and do not listen: the port stays ours while the workers listen on it.

    A port already in use by anything else fails here, with an OSError naming the setting."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise OSError(f"cannot bind gRPC to {host}:{port} (setting host, LOSSD_HOST): {exc.strerror or exc}") from None
    for reuse in (False, True):  # first alone: a port that others share by SO_REUSEPORT is not free either
        if port == 0 and not reuse:
            continue
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot bind gRPC to {host}:{port} (setting grpc_port, LOSSD_GRPC_PORT): {exc.strerror or exc}") from None
        if not reuse:
            sock.close()
    return sock


class WorkerStartError(RuntimeError):
    """A worker exited, or did not serve in time, while ``lossd serve --workers N`` was starting."""


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    pid: int = 0  # the pid that said "ready"
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    restarts: int = 0
    answered: float = 0.0  # when it last answered a health check (or became ready)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerPool:
    """The supervisor's workers: start, keep running, drain and stop them (see the module docstring)."""

    def __init__(self, settings: Settings, directory: Path, history: History) -> None:
        self.directory = directory
        self._port_socket = reserve_port(settings.host, settings.grpc_port)
        self.port = self._port_socket.getsockname()[1]
        self.host = settings.host
        self.settings = settings.model_copy(update={"grpc_port": self.port})
        self._key = secrets.token_bytes(32)
        self._loop = asyncio.get_running_loop()
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._receiver = RecordReceiver(directory, self._key, history, self._ready)
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def backends(self) -> list[str]:
        """The gateway's backends: each worker's private socket."""
        return [f"unix:{socket_of(self.directory, w.index)}" for w in self._workers]

    def views(self) -> list[WorkerView]:
        """Each worker as /metrics shows it (:class:`~lossd.server.worker_watch.WorkersCollector`)."""
        return [WorkerView(w.index, w.pid if w.ready.is_set() else 0, w.ready.is_set(), w.restarts) for w in self._workers]

    async def start(self) -> None:
        """Start every worker and wait until each serves; a worker that exits first fails the start."""
        for w in self._workers:
            self._spawn(w)
        deadline = time.monotonic() + START_SECONDS
        for w in self._workers:
            while not w.ready.is_set():
                code = w.process.poll() if w.process is not None else None
                if code is not None:
                    await self._kill_all()
                    raise WorkerStartError(f"worker {w.index} exited with code {code} before serving (its log is above)")
                if time.monotonic() > deadline:
                    await self._kill_all()
                    raise WorkerStartError(f"worker {w.index} did not start serving within {START_SECONDS:.0f}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.ready.wait(), POLL_SECONDS)
        self._tasks = [asyncio.create_task(self._supervise()), asyncio.create_task(self._watch())]

    def _spawn(self, w: _Worker) -> None:
        env = {
            **os.environ,
            ENV_SETTINGS: self.settings.model_dump_json(),
            ENV_INDEX: str(w.index),
            ENV_DIR: str(self.directory),
            ENV_KEY: self._key.hex(),
        }
        with contextlib.suppress(FileNotFoundError):
            socket_of(self.directory, w.index).unlink()  # a dead worker's socket: gRPC would refuse to bind it
        w.ready.clear()
        w.process = subprocess.Popen([sys.executable, "-m", "lossd.server.worker"], env=env)
        w.started = time.monotonic()
        w.restart_at = None

    def _ready(self, index: int, pid: int) -> None:  # the receiver's thread
        def mark() -> None:
            w = self._workers[index]
            w.pid = pid
            w.answered = time.monotonic()
            w.ready.set()
            log.info("worker %d serving (pid %d)", index, pid)

        self._loop.call_soon_threadsafe(mark)

    async def _supervise(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            for w in self._workers:
                if w.restart_at is not None:
                    if now >= w.restart_at:
                        log.info("restarting worker %d", w.index)
                        self._spawn(w)
                    continue
                code = w.process.poll() if w.process is not None else None
                if code is None:
                    if now - w.started > HEALTHY_SECONDS:
                        w.backoff = FIRST_BACKOFF
                    continue
                pid = w.process.pid if w.process is not None else w.pid
                forget_process(self.directory, pid)
                w.ready.clear()
                w.restart_at = now + w.backoff
                log.error("worker %d (pid %d) exited with code %s; restarting it in %.0fs", w.index, pid, code, w.backoff)
                w.backoff = min(MAX_BACKOFF, w.backoff * 2)
                w.restarts += 1
            await asyncio.sleep(POLL_SECONDS)

    async def _watch(self) -> None:
        """Kill a serving worker that has answered no health check for ``worker_timeout_seconds`` (see worker_watch)."""
        limit = self.settings.worker_timeout_seconds
        while not self._stopping:
            await asyncio.sleep(limit / 3)
            serving = [w for w in self._workers if w.ready.is_set() and w.process is not None]
            answers = await asyncio.gather(*(answers_health(socket_of(self.directory, w.index), limit / 3) for w in serving))
            now = time.monotonic()
            for w, answered in zip(serving, answers, strict=True):
                if answered:
                    w.answered = now
                elif now - w.answered >= limit and not self._stopping and w.process is not None and w.process.poll() is None:
                    log.error("worker %d (pid %d) answered no health check for %.0fs: killing it", w.index, w.pid, now - w.answered)
                    w.process.kill()

    async def drain(self, seconds: float, interrupt: asyncio.Event | None = None) -> None:
        """Every worker reports NOT_SERVING and keeps serving ``seconds``; ``interrupt`` set again ends their drain."""
        self._stopping = True
        _signal(self._workers, signal.SIGTERM)
        log.info("draining %d workers for %.1fs", len(self._workers), seconds)
        waiter = asyncio.Event() if interrupt is None else interrupt
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout=seconds)
        if waiter.is_set():
            _signal(self._workers, signal.SIGTERM)  # their second signal: the drain ends now

    async def stop(self, grace: float | None = None) -> None:
        """Wait for the workers to finish (their grace, and a margin), then kill any left; close everything."""
        if not self._stopping:  # stopped without a drain: the workers still get their SIGTERM
            self._stopping = True
            _signal(self._workers, signal.SIGTERM)
            _signal(self._workers, signal.SIGTERM)
        deadline = time.monotonic() + (grace or 0.0) + self.settings.drain_seconds + 10.0
        while any(w.process is not None and w.process.poll() is None for w in self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        await self._kill_all()
        for task in self._tasks:
            task.cancel()
        self._receiver.close()
        self._port_socket.close()

    async def _kill_all(self) -> None:
        for w in self._workers:
            if w.process is not None and w.process.poll() is None:
                log.warning("killing worker %d (pid %d)", w.index, w.process.pid)
                w.process.kill()
                await asyncio.to_thread(w.process.wait)

    def close_directory(self) -> None:
        """Remove the private directory (after :meth:`stop`)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _signal(workers: list[_Worker], sig: int) -> None:
    """Send ``sig`` to every worker still running."""
    for w in workers:
        if w.process is not None and w.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(sig)
