"""What the supervisor of ``lossd serve --workers N`` hands each worker (stdlib only: a worker reads it before any import starts a thread)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ENV_DIR", "ENV_INDEX", "ENV_KEY", "ENV_SETTINGS", "socket_of"]

ENV_SETTINGS = "LOSSD_WORKER_SETTINGS"  # the supervisor's Settings, as JSON
ENV_INDEX = "LOSSD_WORKER_INDEX"
ENV_DIR = "LOSSD_WORKER_DIR"  # the private (0700) directory: metric files, sockets
ENV_KEY = "LOSSD_WORKER_KEY"  # hex: proves a connection to the supervisor's records socket


def socket_of(directory: Path, index: int) -> Path:
    """The private Unix socket on which worker ``index`` serves the supervisor's gateway."""
    return directory / f"grpc-{index}.sock"
