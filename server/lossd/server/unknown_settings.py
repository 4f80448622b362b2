"""``LOSSD_*`` environment variables that no setting reads: said when ``lossd serve`` starts.

pydantic-settings reads the variables of its fields and ignores every other
one, so ``LOSSD_MAX_CONCURENT_REQUESTS=8`` left the default in place with
nothing said. They are warned about, not refused: the same environment may
hold the client's variables, the container healthcheck's, and Kubernetes'
service links (a Service named ``lossd`` gives its pods ``LOSSD_PORT``,
``LOSSD_SERVICE_HOST``, ... unless ``enableServiceLinks`` is off).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from lossd.client.settings import ENVIRONMENT as CLIENT_VARIABLES
from lossd.server.settings import Settings

__all__ = ["KNOWN_VARIABLES", "unknown_variable_warnings"]

# Read outside Settings, where they act: the client's own, the supervisor's to its workers, the
# container healthcheck's (deploy/docker/healthcheck.py), and tuning read at import time.
_OTHERS = {
    "LOSSD_LOCAL_SEND_INTERVAL",  # lossd.client.local_sends
    "LOSSD_STREAM_IDLE_SECONDS",  # lossd.server.stream_messages
    "LOSSD_MALLOC_ARENAS",  # lossd.server.allocator
    "LOSSD_REUSE_LARGE_BUFFERS",  # lossd.server.allocator, lossd.client.buffers
    "LOSSD_WORKER_DIR",  # lossd.server.supervisor -> lossd.server.worker
    "LOSSD_WORKER_INDEX",
    "LOSSD_WORKER_KEY",
    "LOSSD_WORKER_SETTINGS",
    "LOSSD_HEALTHCHECK_CA_FILE",
    "LOSSD_HEALTHCHECK_CLIENT_CERT_FILE",
    "LOSSD_HEALTHCHECK_CLIENT_KEY_FILE",
    "LOSSD_HEALTHCHECK_SERVER_NAME",
}
KNOWN_VARIABLES = frozenset({f"LOSSD_{name.upper()}" for name in Settings.model_fields} | set(CLIENT_VARIABLES.values()) | _OTHERS)
_SERVICE_LINK = re.compile(r"LOSSD_(PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?|SERVICE_(HOST|PORT(_[A-Z0-9_]+)?))")


def unknown_variable_warnings(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``LOSSD_*`` variable of ``environ`` that nothing reads, with the closest variable that is read."""
    known = sorted(KNOWN_VARIABLES)
    lines = []
    for name in sorted(environ):
        if not name.startswith("LOSSD_") or name in KNOWN_VARIABLES or _SERVICE_LINK.fullmatch(name):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else " (lossd serve --help lists the settings)"
        lines.append(f"environment variable {name} matches no setting and is ignored{hint}")
    return lines
