"""One worker process of ``lossd serve --workers N``: the gRPC server on the shared port, started by the supervisor.

    python -m lossd.server.worker      # only as the supervisor starts it (see lossd.server.supervisor)

The supervisor passes its resolved settings, the worker's index, its private
directory and a per-run key in the environment. The worker serves gRPC on
the supervisor's port with SO_REUSEPORT (the kernel spreads connections over
the workers) and on ``grpc-<index>.sock`` in the private directory for the
supervisor's gateway; it counts its metrics in that directory's files and
sends its history records to the supervisor (:mod:`.monitoring.multiprocess`).

Signals: SIGTERM drains (NOT_SERVING, ``drain_seconds`` of service, then the
grace), a second SIGTERM ends the drain. SIGINT is the supervisor's to
forward: a Ctrl-C in a terminal reaches the whole process group, and the
workers must drain once, when the supervisor says. A worker whose supervisor
is gone (killed, say) stops on its own, without the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from lossd.server.affinity import pin_event_loop
from lossd.server.worker_env import ENV_DIR, ENV_INDEX, ENV_KEY, ENV_SETTINGS, socket_of

__all__ = ["main", "serve_worker"]

log = logging.getLogger("lossd.server")


async def serve_worker(settings_json: str, index: int, directory: Path, key: bytes) -> None:
    """Serve until SIGTERM (then drain) or until the supervisor is gone (then stop at once)."""
    from lossd.server.allocator import set_torch_threads
    from lossd.server.app import create_server, exit_if_compute_busy, reload_credentials
    from lossd.server.monitoring import Monitoring
    from lossd.server.monitoring.multiprocess import SupervisorLink
    from lossd.server.observability.logging import configure_logging
    from lossd.server.observability.tracing import Tracing
    from lossd.server.security import Authenticator
    from lossd.server.settings import Settings

    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings)
    if settings.pin_event_loop:
        log.info("worker %d: event loop on core %s", index, ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    # The host's cores are shared by every worker's compute threads: torch's default per worker divides by all of them.
    set_torch_threads(settings.compute_threads * settings.workers, settings.torch_threads)
    tracing = Tracing.from_settings(settings, os.environ)
    if tracing is not None:
        tracing.install()
    loop = asyncio.get_running_loop()
    stop, signals = asyncio.Event(), asyncio.Event()
    link = SupervisorLink(directory, key)
    link.watch(lambda: _call_soon(loop, stop.set))
    monitoring = Monitoring(settings, forward_records=link.send_records)
    authenticator = Authenticator.from_settings(settings, monitoring.registry)
    running = await create_server(
        settings,
        **monitoring.server_hooks(),
        authenticator=authenticator,
        private_socket=socket_of(directory, index),
        tracing=tracing,
        reuse_port=True,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, _on_term, signals, stop)
    loop.add_signal_handler(signal.SIGHUP, reload_credentials, authenticator)
    link.send(("ready", index, os.getpid()))
    await stop.wait()
    if signals.is_set():  # SIGTERM: drain; a second one (signals set again) ends it
        signals.clear()
        await running.drain(settings.drain_seconds, signals)
    await running.stop(settings.grace_seconds)
    monitoring.close()
    link.close()
    if tracing is not None:
        tracing.shutdown()
    exit_if_compute_busy(running.service, f"worker {index}: ")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop already closed: the worker is exiting anyway
        loop.call_soon_threadsafe(fn)


def _on_term(signals: asyncio.Event, stop: asyncio.Event) -> None:
    signals.set()
    stop.set()


def main() -> int:
    """The worker's entry point: everything it needs comes from the supervisor, in the environment."""
    try:
        settings_json = os.environ.pop(ENV_SETTINGS)
        index = int(os.environ.pop(ENV_INDEX))
        directory = Path(os.environ.pop(ENV_DIR))
        key = bytes.fromhex(os.environ.pop(ENV_KEY))
    except (KeyError, ValueError):
        print("lossd worker: start it with `lossd serve --workers N`, not by hand", file=sys.stderr)
        return 2
    if json.loads(settings_json).get("pin_event_loop"):
        pin_event_loop(index)  # first, before any import starts a thread: gRPC's threads inherit it
    asyncio.run(serve_worker(settings_json, index, directory, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
