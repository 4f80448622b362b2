"""Monitoring across the worker processes of ``lossd serve --workers N``: counters in files, history over a socket.

Each worker counts in its own process, as one ``lossd serve`` does, and the
supervisor (the process serving /metrics and the dashboard) adds them up:

- **Prometheus families** go through prometheus-client's multiprocess mode:
  every process of the server (the workers, and the supervisor for the
  gateway's own families) counts in memory-mapped files of one directory,
  and the supervisor's /metrics renders
  :class:`~prometheus_client.multiprocess.MultiProcessCollector`, which sums
  counters and histograms over every file. A worker that dies keeps its
  counts (its files stay; only its live gauges are dropped), so a restart
  neither loses nor repeats anything.
- **Dashboard history**: a worker sends the :class:`~.history.Record` of each
  batch of evaluations it observed (sums per bucket: a few hundred bytes,
  not tensors) over a Unix socket to the supervisor, whose one
  :class:`~.history.History` (and SQLite file, with ``data_dir``) records
  them as if they had been observed there.

The socket lives in the supervisor's private (0700) directory and each
connection proves the per-run key; its messages are pickles from processes
of the same user that this supervisor started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from lossd.server.monitoring.history import History, Record

__all__ = ["FilteredCollector", "RecordReceiver", "SupervisorLink", "aggregate_registry", "count_in_files", "forget_process"]

log = logging.getLogger("lossd.monitoring")

RECORDS_SOCKET = "records.sock"


class FilteredCollector(Collector):
    """The families of ``registry`` whose names start with one of ``prefixes`` (the supervisor's own, next to the workers')."""

    def __init__(self, registry: CollectorRegistry, prefixes: Sequence[str]) -> None:
        self.registry = registry
        self.prefixes = tuple(prefixes)

    def collect(self) -> Iterator[Any]:
        """Each selected family of the registry, as collected now."""
        for family in self.registry.collect():
            if family.name.startswith(self.prefixes):
                yield family


def aggregate_registry(
    directory: Path, own: CollectorRegistry, own_prefixes: Sequence[str], extra: Sequence[Collector] = ()
) -> CollectorRegistry:
    """The supervisor's /metrics: every worker's files summed, plus the families it counts itself (the gateway's)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(FilteredCollector(own, own_prefixes))
    for collector in extra:
        registry.register(collector)
    return registry


def count_in_files(directory: Path) -> None:
    """Make this process (and the processes it starts) count in ``directory``'s files from now on.

    prometheus-client chooses its value class when it is imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; the supervisor may have imported it before,
    so the class is set here too, as prometheus-client's own tests do."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def forget_process(directory: Path, pid: int) -> None:
    """A worker exited: drop its live gauges (in-flight RPCs); its counters and histograms stay in the sums."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class SupervisorLink:
    """A worker's connection to its supervisor: sends records and "ready", and notices when the supervisor is gone."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self._conn: Connection = Client(str(directory / RECORDS_SOCKET), family="AF_UNIX", authkey=key)
        self._lock = threading.Lock()  # the monitoring thread and the event loop both send
        self.closed = threading.Event()

    def send(self, message: tuple[Any, ...]) -> bool:
        """Send one message; False (and nothing raised) once the supervisor is gone."""
        if self.closed.is_set():
            return False
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, EOFError, ValueError):
            self.closed.set()
            return False
        return True

    def send_records(self, records: Sequence[Record]) -> None:
        """Monitoring's records, for the supervisor's history (free-form tags as a plain dict: protobuf maps do not pickle)."""
        if records:
            self.send(("records", [r._replace(extra=dict(r.extra or {})) for r in records]))

    def watch(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Call ``on_lost`` (from a daemon thread) when the supervisor closes the connection or dies."""

        def wait() -> None:
            try:
                while True:
                    self._conn.recv()  # the supervisor sends nothing: this returns only at EOF
            except (OSError, EOFError, ValueError):
                pass
            self.closed.set()
            on_lost()

        thread = threading.Thread(target=wait, name="lossd-supervisor-link", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Close the connection (the supervisor's reader sees EOF)."""
        self.closed.set()
        self._conn.close()


class RecordReceiver:
    """The supervisor's end: accepts its workers, records what they send into ``history``, reports "ready" messages."""

    def __init__(self, directory: Path, key: bytes, history: History, on_ready: Callable[[int, int], None]) -> None:
        self.history = history
        self.on_ready = on_ready
        self._listener = Listener(str(directory / RECORDS_SOCKET), family="AF_UNIX", authkey=key)
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, name="lossd-records-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except Exception:  # closed, or a connection that failed the key: nothing of ours to keep
                if self._closing:
                    return
                log.warning("a connection to the worker socket was refused", exc_info=True)
                continue
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), name="lossd-records", daemon=True).start()

    def _read(self, conn: Connection) -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == "records":
                    self.history.record_many(message[1])
                elif message[0] == "ready":
                    self.on_ready(int(message[1]), int(message[2]))
        except (OSError, EOFError):
            pass  # the worker exited or closed its end
        except Exception:
            log.exception("dropped a worker's monitoring connection after a message it could not read")
        finally:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            conn.close()

    def close(self) -> None:
        """Stop accepting and close every connection (workers still running see their supervisor gone)."""
        self._closing = True
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            _shut_down(conn)


def _shut_down(conn: Connection) -> None:
    """End the connection for both sides now: a close() alone waits for the reader blocked on it to let go."""
    with contextlib.suppress(OSError):
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
