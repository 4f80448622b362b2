"""Large freed buffers kept in the process for the next message (glibc malloc): one mechanism for clients and ``lossd serve``.

Every large message is a fresh buffer: the client's serialized request and
gRPC's own copy of it, the server's received bytes. glibc serves allocations
above its mmap threshold with a new ``mmap`` and gives them back on free, and
its dynamic threshold stops adapting at 32 MiB; worse, freeing two 16 MB
buffers in a row leaves a free top of heap just over the trim threshold, so
glibc gives both back and the next call faults them in again. Measured here,
a client's 16 MB ``evaluate`` took about 8,200 page faults and 40 ms a call
with glibc's defaults, against a few hundred and 28 ms with the thresholds
raised (the same server, the same run).

:func:`reuse_large_buffers` raises the mmap threshold (allocations up to the
largest message come from the heap) and the trim threshold (the heap keeps
a few such buffers free for the next message). The cost: resident memory
stays at its high-water mark, up to the trim threshold above what is live.
The thresholds only ever go up within a process, so a client opened in a
process serving lossd (a test's in-process server, say) keeps the server's larger ones.

``LOSSD_REUSE_LARGE_BUFFERS=false`` leaves glibc's defaults alone, in
clients and in ``lossd serve``; so do glibc's own ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` and ``GLIBC_TUNABLES``
malloc settings when set (the operator's choice stands). Elsewhere than
glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Mapping

from lossd.client.settings import reuse_large_buffers_enabled

__all__ = ["libc", "reuse_large_buffers", "reuse_for_messages", "applied_threshold", "MAX_THRESHOLD"]

log = logging.getLogger("lossd.client")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MAX_THRESHOLD = 1 << 30
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied = 0  # the mmap threshold this process set (0: none yet)
_mutex = threading.Lock()


def libc() -> ctypes.CDLL | None:
    """The C library, or None where it cannot be loaded."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def applied_threshold() -> int:
    """The mmap threshold lossd set in this process (0: glibc's own)."""
    return _applied


def _operator_chose(environ: Mapping[str, str]) -> bool:
    if any(name in environ for name in _OPERATOR_SETTINGS):
        return True
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(key in tunables for key in ("malloc.mmap_threshold", "malloc.trim_threshold", "malloc.top_pad"))


def reuse_large_buffers(max_message_bytes: int, *, top_pad: int | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Keep freed buffers of messages up to ``max_message_bytes`` for reuse; False where that is not possible.

    True when the thresholds are (already) at least this high; False where
    glibc's own malloc settings are in the environment (``environ``, default
    ``os.environ``). ``top_pad``: extra bytes the heap grows by at a time
    (``lossd serve``: 64 MiB)."""
    global _applied
    if _operator_chose(os.environ if environ is None else environ):
        log.info("glibc malloc settings are in the environment: lossd leaves the malloc thresholds to them")
        return False
    threshold = min(max(max_message_bytes, 1 << 20), MAX_THRESHOLD)
    with _mutex:
        if threshold <= _applied:
            return True
        mallopt = getattr(libc(), "mallopt", None)
        if mallopt is None:
            log.info("not a glibc process: large buffers are returned to the OS after each message")
            return False
        ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
        if ok and top_pad is not None:
            ok = bool(mallopt(_M_TOP_PAD, top_pad))
        if not ok:
            log.warning("mallopt refused the buffer-reuse thresholds; large buffers are returned to the OS after each message")
            return False
        _applied = threshold
        return True


def reuse_for_messages(message_bytes: int, environ: Mapping[str, str] | None = None) -> bool:
    """A client's tuning: buffers for messages of ``message_bytes`` and gRPC's copy of each, unless turned off.

    Off (False) when ``LOSSD_REUSE_LARGE_BUFFERS`` is false
    (:func:`lossd.client.settings.reuse_large_buffers_enabled`) or glibc's
    malloc settings are in the environment; False also where nothing is applied."""
    env = os.environ if environ is None else environ
    if not reuse_large_buffers_enabled(env):
        return False
    # Twice the message: the serialized request and gRPC's copy are freed together (module docstring).
    return reuse_large_buffers(2 * message_bytes, environ=env)
